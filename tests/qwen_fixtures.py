"""Tiny Qwen2.5-VL models and tokenizer, built offline (no hub): shared by the Qwen-VL and Qwen-Image-Edit tests.

`VL_CONFIGS` differ in every language-model knob (hidden and head sizes, GQA ratio from 1 to 4, depth, mrope_section,
rope_theta, tied lm_head, rms eps, activation, vocab size) and carry a small valid vision tower each. The tokenizer is
a byte-level BPE trained on a few sentences with Qwen's special tokens, wrapped in transformers' Qwen2TokenizerFast;
the configs' image / video / vision start / end token ids are its ids.
"""
import json
import os

import numpy as np
import torch

from tests.sd15_fixtures import randomize_norms

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>")  # after <|endoftext|>, which Qwen2TokenizerFast adds itself (eos, pad, unk)
CORPUS = ("a red cat sits on the mat", "describe the picture in detail", "replace the sky with a sunset",
          "the quick brown fox jumps over the lazy dog", "make the text say hello world")
BPE_VOCAB = 280  # 256 byte symbols + 24 merges; the special tokens follow (287 tokens in all)

VL_CONFIGS = {  # name -> text config, vision config, tie_word_embeddings
    # GQA 2:1, head dim 8, untied, silu; vision: patch 4, merge 2, two frames per patch, a full-attention block
    "gqa": (dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, hidden_act="silu",
                 rope_parameters=dict(rope_type="default", rope_theta=5000.0, mrope_section=[2, 1, 1])),
            dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]), False),
    # multi-head (kv heads == heads), head dim 12, three layers, tied lm_head, tanh GELU, Qwen's rope_theta
    "mha": (dict(vocab_size=320, hidden_size=36, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
                 num_key_value_heads=3, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 2, 2])),
            dict(depth=1, hidden_size=24, intermediate_size=32, num_heads=3, patch_size=2, spatial_merge_size=2,
                 temporal_patch_size=1, window_size=8, fullatt_block_indexes=[]), True),
    # GQA 4:1 (one kv head), head dim 16, one layer, untied, exact GELU; vision: merge 3
    "mqa": (dict(vocab_size=290, hidden_size=64, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=1, rms_norm_eps=3e-6, hidden_act="gelu",
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])),
            dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=4, patch_size=2, spatial_merge_size=3,
                 temporal_patch_size=2, window_size=12, fullatt_block_indexes=[0]), False),
}


def tiny_tokenizer(folder: str | os.PathLike | None = None):
    """The tiny Qwen2TokenizerFast (right padding); saved to `folder` (tokenizer.json + config) when given."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2TokenizerFast(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.padding_side = "right"
    if folder is not None:
        tokenizer.save_pretrained(os.fspath(folder))
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    """The Qwen2_5_VLConfig token-id fields, from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def tiny_vl_config(name: str):
    """transformers' Qwen2_5_VLConfig for one of VL_CONFIGS, with the tiny tokenizer's token ids."""
    from transformers import Qwen2_5_VLConfig

    text, vision, tied = VL_CONFIGS[name]
    tokenizer = tiny_tokenizer()
    ends = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    text = dict(text, bos_token_id=ends[0], eos_token_id=ends[1], pad_token_id=ends[0])
    vision = dict(vision, out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied,
                            **token_ids(tokenizer))


def tiny_vl_model(name: str, seed: int = 0):
    """A random Qwen2_5_VLForConditionalGeneration (eval mode, norms and biases perturbed, fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return randomize_norms(Qwen2_5_VLForConditionalGeneration(tiny_vl_config(name)).eval())


def save_tiny_vl(folder: str | os.PathLike, name: str, seed: int = 0):
    """`tiny_vl_model` saved as a transformers folder (config.json + model.safetensors; transformers 5 writes the
    older `model.layers.*` / `visual.*` key layout) with the tiny tokenizer beside it. Returns the torch model."""
    model = tiny_vl_model(name, seed)
    model.save_pretrained(os.fspath(folder))
    tiny_tokenizer(folder)
    return model


def image_prompt(text: str, image_tokens: list[int]) -> str:
    """A user turn with one <|vision_start|><|image_pad|> x n<|vision_end|> block per image (n = its merged
    tokens, as Qwen's processor expands it) before the text."""
    blocks = "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" for n in image_tokens)
    return f"<|im_start|>user\n{blocks}{text}<|im_end|>"


def merged_tokens(model, grid) -> int:
    """Language-model tokens of one (t, h, w) patch grid: t h w / spatial_merge_size^2."""
    return int(np.prod(grid)) // model.config.vision_config.spatial_merge_size ** 2


def random_patches(model, grids, seed: int = 0) -> np.ndarray:
    """Random flattened patches (sum of t h w, channels x temporal_patch_size x patch_size^2) for the grids."""
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return np.random.default_rng(seed).standard_normal((sum(int(np.prod(g)) for g in grids), width), np.float32)


def torch_image_features(model, patches: np.ndarray, grids) -> np.ndarray:
    """transformers' merged vision features of every image, concatenated: (image tokens, text hidden_size)."""
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(patches), torch.tensor(np.asarray(grids)))
    return torch.cat(out.pooler_output, dim=0).numpy()


def torch_forward(model, input_ids: np.ndarray, attention_mask: np.ndarray, patches=None, grids=None):
    """transformers' (last hidden state after the final norm, logits), with multimodal RoPE (the image tokens'
    mm_token_type_ids given, as Qwen's processor returns them)."""
    image_token = model.config.image_token_id
    kwargs = {}
    if patches is not None:
        kwargs = dict(pixel_values=torch.from_numpy(patches), image_grid_thw=torch.tensor(np.asarray(grids)),
                      mm_token_type_ids=torch.from_numpy((input_ids == image_token).astype(np.int64)))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                    output_hidden_states=True, **kwargs)
    return out.hidden_states[-1].numpy(), out.logits.numpy()
