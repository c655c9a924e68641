"""What a run trains: the whole denoiser, LoRA adapters on matching kernels, a named subset, or both.

The trainer keeps two trees: the frozen `base` (the denoiser as loaded; empty
for full fine-tuning) and the `trainable` tree that the optimizer, EMA and the
old / reference copies hold. `merge(base, trainable)` gives the denoiser
parameters the model runs with, inside the jitted programs, so only the
trainable tree has optimizer state and gradients.

LoRA (Hu et al., 2021) on a kernel W of shape (..., in, out): W + alpha / rank *
A @ B with A (..., in, rank) drawn uniform(+-1/sqrt(in)) and B (..., rank, out)
zero, so a fresh adapter leaves the model unchanged (the reference policy is the
base without the adapter, at no extra memory). A leading axis is a scanned
stack of layers, each with its own adapter. 'subset+lora' trains a subset in
full and LoRA on other kernels (an added module plus LoRA on the base, as
Calligrapher's trainer offers); the two patterns must not select the same leaf.
"""
import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

Params = Any

MODES = ("full", "lora", "subset", "subset+lora")
# diffusers' usual attention targets: to_q/k/v/out (SD1.5 names to_out_0), Flux's text-stream projections
ATTENTION_PROJECTIONS = r"/(to_q|to_k|to_v|to_out|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel$"


@dataclasses.dataclass(frozen=True)
class Trainable:
    mode: str = "full"
    pattern: str = ""  # regex searched in "/"-joined parameter paths: the subset trained in full
    rank: int = 0
    alpha: float = 0.0
    lora_pattern: str = ""  # the same kind of regex: the kernels that get LoRA adapters

    @property
    def trains_subset(self) -> bool:
        return self.mode in ("subset", "subset+lora")

    @property
    def trains_lora(self) -> bool:
        return self.mode in ("lora", "subset+lora")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def from_config(train) -> Trainable:
    """The spec from config.train (trainable, trainable_pattern, lora_pattern, lora_rank, lora_alpha), checked."""
    mode = train.trainable
    if mode not in MODES:
        raise ValueError(f"config: train.trainable={mode!r}: expected one of {MODES}")
    spec = Trainable(mode, train.trainable_pattern, train.lora_rank, float(train.lora_alpha),
                     train.lora_pattern or ATTENTION_PROJECTIONS)
    if spec.trains_subset and not spec.pattern:
        raise ValueError(f"config: train.trainable={mode!r} needs train.trainable_pattern (a regex on parameter "
                         "paths such as 'single_blocks/.*/proj_out')")
    if not spec.trains_subset and spec.pattern:
        raise ValueError(f"config: train.trainable_pattern={spec.pattern!r} names a subset trained in full, which "
                         f"train.trainable={mode!r} does not train; LoRA targets are train.lora_pattern")
    if spec.trains_lora and spec.rank < 1:
        raise ValueError(f"config: train.lora_rank={spec.rank}: expected >= 1")
    for name, pattern in (("trainable_pattern", spec.pattern), ("lora_pattern", spec.lora_pattern)):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"config: train.{name}={pattern!r} is not a regex: {error}") from error
    return spec


def build(train, params: Params, key: jax.Array) -> tuple[Any, Params, Params]:
    """(merge: (base, trainable) -> denoiser params, frozen base, initial trainable tree) for the loaded
    denoiser `params` from config.train; `key` draws LoRA's A."""
    spec = from_config(train)
    return functools.partial(merge, spec), frozen_base(spec, params), init(spec, params, key)


def _selected(pattern: str, field: str, params: Params) -> dict[tuple, Any]:
    """The flat {path: leaf} `pattern` (config field train.`field`) selects; an error naming it when it selects
    nothing."""
    flat = traverse_util.flatten_dict(params)
    chosen = {path: leaf for path, leaf in flat.items() if re.search(pattern, "/" + "/".join(path))}
    if not chosen:
        examples = ", ".join("/".join(path) for path in list(flat)[:8])
        raise ValueError(f"config: train.{field}={pattern!r} matches no denoiser parameter; "
                         f"paths look like: {examples}")
    return chosen


def _master_dtype(leaf) -> jnp.dtype:
    """fp32 for a floating leaf: Adam's ~lr-sized steps vanish in bf16's 8-bit mantissa."""
    return jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype


def init(spec: Trainable, params: Params, key: jax.Array) -> Params:
    """The trainable tree for the loaded denoiser `params` (for 'full', `params` itself)."""
    if spec.mode == "full":
        return params
    tree = {}
    if spec.trains_subset:  # fp32 copies (master weights, as LoRA's), whatever dtype the frozen base keeps
        tree = {path: jnp.array(leaf, _master_dtype(leaf))
                for path, leaf in _selected(spec.pattern, "trainable_pattern", params).items()}
    if spec.trains_lora:
        targets = _selected(spec.lora_pattern, "lora_pattern", params)
        both = sorted("/".join(path) for path in set(targets) & set(tree))
        if both:
            raise ValueError(f"config: train.trainable_pattern and train.lora_pattern both select {both[:4]}: a "
                             "leaf is trained in full or through LoRA, not both")
        tree.update(_lora_adapters(spec, targets, key))
    return traverse_util.unflatten_dict(tree)


def _lora_adapters(spec: Trainable, targets: dict[tuple, Any], key: jax.Array) -> dict[tuple, Any]:
    """{kernel path + ('lora_a' | 'lora_b'): fp32 factor}: A uniform(+-1/sqrt(in)), B zero."""
    adapters = {}
    for (path, kernel), leaf_key in zip(targets.items(), jax.random.split(key, len(targets))):
        if kernel.ndim not in (2, 3):
            raise ValueError(f"LoRA target {'/'.join(path)} has shape {kernel.shape}: expected a dense kernel "
                             "(in, out), or a scanned stack (layers, in, out); narrow train.trainable_pattern")
        *stack, fan_in, fan_out = kernel.shape
        bound = 1.0 / fan_in ** 0.5
        adapters[path + ("lora_a",)] = jax.random.uniform(leaf_key, (*stack, fan_in, spec.rank), jnp.float32,
                                                          -bound, bound)
        adapters[path + ("lora_b",)] = jnp.zeros((*stack, spec.rank, fan_out), jnp.float32)
    return adapters


def frozen_base(spec: Trainable, params: Params) -> Params:
    """What stays fixed and is passed next to the trainable tree (nothing for full fine-tuning)."""
    return {} if spec.mode == "full" else params


def merge(spec: Trainable, base: Params, trainable: Params) -> Params:
    """The denoiser parameters the model runs with."""
    if spec.mode == "full":
        return trainable
    flat = traverse_util.flatten_dict(base)
    trained = traverse_util.flatten_dict(trainable)
    for path, leaf in trained.items():
        if path[-1] == "lora_a":
            kernel = flat[path[:-1]]
            delta = spec.scale * jnp.matmul(leaf, trained[path[:-1] + ("lora_b",)], precision="highest")
            flat[path[:-1]] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        elif path[-1] != "lora_b":
            flat[path] = leaf
    return traverse_util.unflatten_dict(flat)
