"""OCR reward: does the generated text read as the target text?

score = 1 - Levenshtein(read, target) / max(len(read), len(target), 1), after
normalising both strings the same way:
- case: folded to lower case unless `case_sensitive=True`;
- whitespace: `whitespace="ignore"` (default) drops all of it, because OCR
  inserts and drops spaces between glyphs far more often than diffusion models
  do; `whitespace="collapse"` keeps word breaks as single spaces.
So the right text scores 1, a blank image scores 0 against any non-empty target.
The target is meta['target_text'] (`target="target_text"`, the dataset's field) or,
with `target="quoted"`, the text between the first pair of double quotes of each
prompt (Flow-GRPO's OCR prompts: 'A shop sign that reads "OPEN"'); a prompt
without one is an error naming it, never a score.

Two ways to read an image, set by `mode`:
- "crop" (fast path): recognition only, on the bounding box of the mask (padded
  by `crop_pad` pixels). One text line per mask is assumed; all crops of a batch
  go through the recogniser in one batched call.
- "full": detection + recognition on the whole image, lines joined in reading
  order (top to bottom, left to right) with spaces; lines read with confidence
  below `min_confidence` are left out. For multi-line targets or maskless editing.

rapidocr ships its ONNX models in the wheel, so this runs offline.
"""
import threading
from typing import Sequence

import numpy as np

from jax_inpaint_rl.rewards.base import Meta, Scores, check_images, check_prompts, mask_boxes, meta_mask, meta_texts

_ENGINE_LOCK = threading.Lock()
_ENGINES: dict[tuple[int, float], object] = {}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalize_text(text: str, case_sensitive: bool, whitespace: str) -> str:
    if whitespace == "ignore":
        text = "".join(text.split())
    elif whitespace == "collapse":
        text = " ".join(text.split())
    else:
        raise ValueError(f"whitespace must be 'ignore' or 'collapse', got {whitespace!r}")
    return text if case_sensitive else text.casefold()


def text_similarity(read: str, target: str) -> float:
    """1 - normalised edit distance, in [0, 1]; both strings already normalised."""
    return 1.0 - levenshtein(read, target) / max(len(read), len(target), 1)


def _engine(threads: int, min_confidence: float):
    """One rapidocr engine per setting, shared by all rewards (its ONNX sessions are thread-safe)."""
    key = (threads, min_confidence)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            from rapidocr import RapidOCR

            params = {"Global.log_level": "error", "Global.use_cls": False, "Global.text_score": min_confidence}
            if threads > 0:
                for stage in ("onnxruntime.intra_op_num_threads", "onnxruntime.inter_op_num_threads"):
                    params[f"EngineConfig.{stage}"] = threads
            _ENGINES[key] = RapidOCR(params=params)
        return _ENGINES[key]


def read_crops(images: np.ndarray, boxes, pad: int, threads: int = 0) -> list[str]:
    """Recognise one text line in each (top, left, bottom, right) box, all boxes in one batched call."""
    empty = [i for i, box in enumerate(boxes) if box is None]
    if empty:
        raise ValueError(f"ocr: meta['mask'] is empty for samples {empty}; the crop mode reads inside the mask "
                         "(use mode='full' for maskless samples)")
    height, width = images.shape[1:3]
    crops = []
    for image, (top, left, bottom, right) in zip(images, boxes):
        crop = image[max(top - pad, 0) : min(bottom + pad, height), max(left - pad, 0) : min(right + pad, width)]
        crops.append(np.ascontiguousarray(crop[..., ::-1]))  # rapidocr expects BGR
    return list(_engine(threads, 0.0).recognize_txt(crops).txts)


def read_full(images: np.ndarray, min_confidence: float, threads: int = 0) -> list[str]:
    """Detect and recognise all text lines of each image, joined in reading order."""
    engine = _engine(threads, min_confidence)
    texts = []
    for image in images:
        result = engine(np.ascontiguousarray(image[..., ::-1]))
        texts.append(" ".join(result.txts) if getattr(result, "txts", None) else "")
    return texts


def quoted_text(prompt: str) -> str:
    """The text between the first two double quotes of `prompt`."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"ocr: target='quoted' but the prompt {prompt!r} has no text in double quotes")
    return parts[1]


TARGETS = ("target_text", "quoted")


def make_ocr_reward(
    mode: str = "crop",
    target: str = "target_text",
    case_sensitive: bool = False,
    whitespace: str = "ignore",
    crop_pad: int = 8,
    min_confidence: float = 0.5,
    threads: int = 0,
):
    """OCR reward against meta['target_text'] or the prompts' quoted text (see module docstring); `threads` 0 =
    onnxruntime default."""
    if mode not in ("crop", "full"):
        raise ValueError(f"ocr: mode must be 'crop' or 'full', got {mode!r}")
    if target not in TARGETS:
        raise ValueError(f"ocr: target must be one of {TARGETS}, got {target!r}")
    normalize_text("", case_sensitive, whitespace)  # reject a bad `whitespace` at build time

    def read_texts(images: np.ndarray, meta: Meta) -> list[str]:
        """What the OCR read in each image (also handy for logging samples)."""
        if mode == "crop":
            return read_crops(images, mask_boxes(meta_mask(meta, images, "ocr")), crop_pad, threads)
        return read_full(images, min_confidence, threads)

    def ocr_reward(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        check_prompts(prompts, len(images))
        targets = ([quoted_text(prompt) for prompt in prompts] if target == "quoted"
                   else meta_texts(meta, "target_text", len(images), "ocr"))
        scores = [
            text_similarity(normalize_text(t, case_sensitive, whitespace), normalize_text(g, case_sensitive, whitespace))
            for t, g in zip(read_texts(images, meta), targets)
        ]
        return {"score": np.asarray(scores, np.float32)}

    ocr_reward.read_texts = read_texts
    return ocr_reward
