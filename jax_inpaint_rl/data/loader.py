"""Host-side batches: deterministic order, per-host shards, GRPO groups, exact resume, prefetch.

Order. Epoch e visits the dataset in `permutation(N)` drawn from seed (seed, e)
(or in file order with shuffle=False). Global batch b of epoch e takes positions
[b*G, (b+1)*G) of that order, G = prompts_per_batch * process_count; host p takes
the p-th block of prompts_per_batch positions. Hosts thus read disjoint shards and
each example is used exactly once per epoch across hosts. When N is not a multiple
of G the last batch is topped up from the start of the order and those slots have
valid=False (or, with drop_remainder, the remainder is skipped), so every host
runs the same number of steps.

Position. `state()` is a small dict of ints: 'epoch', 'index' (global batches
already taken in that epoch) and what fixes the order ('num_examples',
'global_batch', 'seed', 'shuffle'). Put it in the checkpoint and `restore()` it
to continue with the very next batch; the host count may change if the global
batch stays the same. Restoring a state saved for another dataset size, global
batch or seed is an error.

Batch (B = prompts_per_batch * group_size rows, group-major: the k samples of a
prompt are adjacent):
    id, prompt, target_text   lists of B str (target_text entries may be None)
    metadata                  list of B str, JSON objects (sources whose examples have one: Flow-GRPO
                              GenEval sets); the trainer hands it to rewards as meta['metadata']
    image, target             float32 (B, H, W, 3) in [-1, 1]   (sources with images)
    mask                      float32 (B, H, W, 1) in {0, 1}     (inpaint sources)
    style_image               float32 (B, S, S, 3) in [-1, 1]: target cropped to the
                              mask's bounding box, letterboxed onto black (with style_resolution)
    embeddings                {name: (B, ...) array}
    group_id                  int32 (B,): global prompt slot, process_index *
                              prompts_per_batch + local prompt (what advantages group by)
    example_index             int64 (B,): index in the source (per-prompt statistics)
    valid                     bool (B,): False for top-up rows of a last partial batch
"""
import math
import queue
import threading
import time

import numpy as np
from PIL import Image

from jax_inpaint_rl.data import masks
from jax_inpaint_rl.data.formats import DataError, read_flow_grpo
from jax_inpaint_rl.data.sources import open_source
from jax_inpaint_rl.data.synthetic import SyntheticSource
from jax_inpaint_rl.data.validate import find_problems

_STOP_POLL_S = 0.1


def resize_and_crop(example: dict, height: int, width: int) -> dict:
    """Scale image / mask / target to cover (height, width), then crop a window centred on the mask.

    Images are resized bicubically, masks with nearest neighbour (so they stay
    binary); all three use the same scale and window, so they stay aligned and
    the region to fill stays in view.
    """
    image = example["image"]
    in_h, in_w = image.shape[:2]
    scale = max(height / in_h, width / in_w)
    new_h, new_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    box = masks.bounding_box(example["mask"]) if "mask" in example else None
    centre_y, centre_x = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box else (in_h / 2, in_w / 2)
    top = int(np.clip(round(centre_y * new_h / in_h - height / 2), 0, new_h - height))
    left = int(np.clip(round(centre_x * new_w / in_w - width / 2), 0, new_w - width))
    window = (left, top, left + width, top + height)
    fitted = dict(example)
    for field in ("image", "target"):
        if field in example:
            fitted[field] = _resize_crop_rgb(example[field], (new_w, new_h), window)
    if "mask" in example:
        mask_image = Image.fromarray((example["mask"][..., 0] * 255).astype(np.uint8))
        if mask_image.size != (new_w, new_h):
            mask_image = mask_image.resize((new_w, new_h), Image.NEAREST)
        fitted["mask"] = masks.binarize(np.asarray(mask_image.crop(window)))
    return fitted


def _resize_crop_rgb(image: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    resized = Image.fromarray(image)
    if resized.size != size:
        resized = resized.resize(size, Image.BICUBIC)
    return np.asarray(resized.crop(window))


def style_crop(target: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """The target inside the mask's bounding box, letterboxed onto a black (size, size) square: the adapter's
    style image. The crop keeps its aspect: scaled (bilinear) by min(size / w, size / h) and centred, as
    Calligrapher's `resize_img_and_pad` prepares its reference."""
    top, left, bottom, right = masks.bounding_box(mask)
    crop = Image.fromarray(target[top:bottom, left:right])
    scale = min(size / crop.width, size / crop.height)
    width, height = max(1, int(crop.width * scale)), max(1, int(crop.height * scale))
    square = Image.new("RGB", (size, size), (0, 0, 0))
    square.paste(crop.resize((width, height), Image.BILINEAR), ((size - width) // 2, (size - height) // 2))
    return np.asarray(square)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (what the VAEs take)."""
    return image.astype(np.float32) / 127.5 - 1.0


def prepare(example: dict, resolution: tuple[int, int] | None, style_resolution: int | None) -> dict:
    """One example as it enters a batch: fitted to the resolution, images in [-1, 1]."""
    if "image" in example:
        example = resize_and_crop(example, *resolution)
    prepared = dict(example)
    for field in ("image", "target"):
        if field in example:
            prepared[field] = to_unit_range(example[field])
    if style_resolution:
        prepared["style_image"] = to_unit_range(style_crop(example["target"], example["mask"], style_resolution))
    return prepared


def collate(examples: list[dict], indices: np.ndarray, valid: np.ndarray, group_size: int,
            first_group: int) -> dict:
    """Stack prepared examples and repeat each group_size times (group-major)."""
    def repeat(values):
        return [value for value in values for _ in range(group_size)]

    batch = {field: repeat(example[field] for example in examples) for field in ("id", "prompt", "target_text")}
    if "metadata" in examples[0]:
        batch["metadata"] = repeat(example["metadata"] for example in examples)
    for field in ("image", "mask", "target", "style_image"):
        if field in examples[0]:
            batch[field] = np.repeat(np.stack([example[field] for example in examples]), group_size, axis=0)
    batch["embeddings"] = {name: np.repeat(np.stack([example["embeddings"][name] for example in examples]),
                                           group_size, axis=0) for name in examples[0]["embeddings"]}
    batch["group_id"] = np.repeat(np.arange(len(examples), dtype=np.int32) + first_group, group_size)
    batch["example_index"] = np.repeat(indices.astype(np.int64), group_size)
    batch["valid"] = np.repeat(valid, group_size)
    return batch


class Loader:
    """An endless iterator of this host's batches over a source (see the module docstring).

    With validate=True (default) every example is read once at construction and
    all problems are raised together as one DataError, before any compile.
    prefetch > 0 builds that many batches ahead in a background thread;
    `wait_seconds` accumulates the time the consumer spent blocked in `next()`.
    """

    def __init__(self, source, *, prompts_per_batch: int, group_size: int = 1,
                 resolution: int | tuple[int, int] | None = None, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = False,
                 prefetch: int = 2, style_resolution: int | None = None, validate: bool = True):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index}: expected in [0, process_count={process_count})")
        if prompts_per_batch < 1 or group_size < 1:
            raise ValueError(f"prompts_per_batch={prompts_per_batch}, group_size={group_size}: expected >= 1")
        if validate:
            problems = find_problems(source)
            if problems:
                raise DataError(problems)
        if len(source) == 0:
            raise DataError([f"{source.name}: dataset is empty"])
        if source.kind != "prompts" and resolution is None:
            raise ValueError(f"{source.name} has images: set resolution (int or (height, width))")
        lacking = sorted({"mask", "target"} - source.fields)
        if style_resolution and lacking:
            raise ValueError(f"style_resolution needs a mask and a target in every example; {source.name} "
                             f"lacks {lacking} (it provides {sorted(source.fields)})")
        self.source = source
        self.prompts_per_batch, self.group_size = prompts_per_batch, group_size
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else resolution
        self.style_resolution = style_resolution
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.prefetch = prefetch
        self.global_batch = prompts_per_batch * process_count
        rounding = math.floor if drop_remainder else math.ceil
        self.steps_per_epoch = rounding(len(source) / self.global_batch)
        if self.steps_per_epoch == 0:
            raise DataError([f"{source.name}: {len(source)} examples, fewer than one global batch of "
                             f"{self.global_batch} (prompts_per_batch x process_count) with drop_remainder"])
        self.wait_seconds = 0.0
        self._position = (0, 0)
        self._order = (None, None)  # (epoch, its order): computed once per epoch
        self._queue = None
        self._stop = None
        self._thread = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def fields(self) -> frozenset[str]:
        """The source's fields, plus 'style_image' when batches carry one."""
        return self.source.fields | ({"style_image"} if self.style_resolution else set())

    def state(self) -> dict:
        """Position after the last batch returned, plus what makes a position mean the same batches."""
        return {"epoch": self._position[0], "index": self._position[1], **self._order_key()}

    def restore(self, state: dict) -> None:
        """Continue from a position saved by state(); the next batch is the one that followed it."""
        saved_key = {key: int(state[key]) for key in self._order_key()}
        if saved_key != self._order_key():
            raise ValueError(f"loader state {state} was saved for {saved_key}, this loader has "
                             f"{self._order_key()}: the same position would give other batches")
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.steps_per_epoch:
            raise ValueError(f"loader state {state}: index expected in [0, {self.steps_per_epoch})")
        self._stop_prefetch()
        self._position = (epoch, index)

    def _order_key(self) -> dict:
        return {"num_examples": len(self.source), "global_batch": self.global_batch, "seed": self.seed,
                "shuffle": int(self.shuffle)}

    def batch_at(self, epoch: int, index: int) -> dict:
        """This host's batch `index` of `epoch` (pure: depends only on the arguments and the config)."""
        slots = index * self.global_batch + self.process_index * self.prompts_per_batch + np.arange(
            self.prompts_per_batch)
        order = self.epoch_order(epoch)
        indices = order[slots % len(order)]
        examples = [prepare(self.source[int(i)], self.resolution, self.style_resolution) for i in indices]
        return collate(examples, indices, slots < len(order), self.group_size,
                       self.process_index * self.prompts_per_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the source (same on every host)."""
        if self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.source)) if self.shuffle
                     else np.arange(len(self.source)))
            self._order = (epoch, order)
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        if self.prefetch <= 0:
            position = self._position
            batch = self.batch_at(*position)
            self._position = self._advance(position)
        else:
            if self._thread is None:
                self._start_prefetch()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._stop_prefetch()
                raise item
            self._position, batch = item
        self.wait_seconds += time.perf_counter() - start
        return batch


    def close(self) -> None:
        """Stop the prefetch thread (also done by restore and on errors)."""
        self._stop_prefetch()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _advance(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, index = position
        return (epoch + 1, 0) if index + 1 >= self.steps_per_epoch else (epoch, index + 1)

    def _start_prefetch(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._position, self._queue, self._stop),
                                        name="data-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, position, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (self._advance(position), self.batch_at(*position))
            except Exception as error:  # handed to the consumer, which re-raises it
                item = error
            while not stop.is_set():
                try:
                    out.put(item, timeout=_STOP_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            position = item[0]

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue, self._stop = None, None, None


def loaders_from_config(data, *, prompts_per_batch: int, seed: int, sft_batch_size: int | None = None,
                        style_resolution: int | None = None, process_index: int = 0, process_count: int = 1):
    """(train, eval or None, sft or None) loaders for a config's `data` section.

    data.format 'synthetic' generates data.num_examples / data.num_eval_examples
    examples at data.resolution (eval with seed + 1); 'flow_grpo' reads split 'train'
    of the Flow-GRPO folder data.path and split 'test' of data.eval_path (default:
    data.path); any other format opens data.path / data.eval_path with open_source
    (self_bench folder, JSON / JSONL, prompt list, TFDS folder or tfds:NAME; the
    format is recognised from the path).
    Train batches hold prompts_per_batch prompts per host (the trainer forms the
    groups), eval batches prompts_per_batch distinct prompts in file order, and
    SFT batches (when `sft_batch_size` is given) sft_batch_size examples per host,
    in their own seeded order over the train set. With `style_resolution` every
    batch carries the style image.
    """
    if data.format == "synthetic":
        kinds = tuple(data.synthetic_kinds)
        train_source = SyntheticSource(data.num_examples, data.resolution, seed, kinds)
        eval_source = SyntheticSource(data.num_eval_examples, data.resolution, seed + 1, kinds)
    else:
        if not data.path:
            raise ValueError(f"config: data.path is empty for data.format={data.format!r}")
        if data.format == "flow_grpo":
            train_source = read_flow_grpo(data.path, "train")
            eval_source = read_flow_grpo(data.eval_path or data.path, "test")
        else:
            train_source = open_source(data.path)
            eval_source = open_source(data.eval_path) if data.eval_path else None
    hosts = dict(process_index=process_index, process_count=process_count, resolution=data.resolution,
                 style_resolution=style_resolution)
    train = Loader(train_source, prompts_per_batch=prompts_per_batch, seed=seed, **hosts)
    held_out = (Loader(eval_source, prompts_per_batch=prompts_per_batch, shuffle=False, **hosts)
                if eval_source is not None else None)
    sft = (Loader(train_source, prompts_per_batch=sft_batch_size, seed=seed + 1, validate=False, **hosts)
           if sft_batch_size else None)
    return train, held_out, sft
