"""Trainable subsets: LoRA merge against NumPy, gradients, bad specs, and the default targets on real configs."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import traverse_util

from jax_inpaint_rl.algorithms import trainable
from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.sd15 import family as sd15_inpaint
from tests.test_flux_transformer import REAL as FLUX_REAL
from tools.convert_weights.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE


def spec(mode="lora", pattern="", rank=3, alpha=6.0, lora_pattern=""):
    """A spec from config fields; `pattern` is the LoRA targets for 'lora', the subset otherwise."""
    if mode == "lora":
        pattern, lora_pattern = "", pattern
    train = ml_collections.ConfigDict({"trainable": mode, "trainable_pattern": pattern, "lora_rank": rank,
                                       "lora_alpha": alpha, "lora_pattern": lora_pattern})
    return trainable.from_config(train)


def base_params():
    rng = np.random.default_rng(0)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {"blocks": {"attn": {"to_q": {"kernel": draw(2, 8, 6), "bias": draw(2, 6)}}},
            "proj": {"kernel": draw(8, 5), "bias": draw(5)}, "conv": {"kernel": draw(3, 3, 4, 4)}}


def test_fresh_adapter_is_the_base_and_merge_matches_numpy():
    lora, base = spec(pattern=r"(to_q|proj)/kernel$"), base_params()
    adapters = trainable.init(lora, base, jax.random.key(0))
    assert set(adapters) == {"blocks", "proj"} and set(adapters["proj"]["kernel"]) == {"lora_a", "lora_b"}
    assert adapters["blocks"]["attn"]["to_q"]["kernel"]["lora_a"].shape == (2, 8, 3)
    merged = trainable.merge(lora, base, adapters)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
        np.testing.assert_array_equal(got, want)

    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), adapters)
    merged = trainable.merge(lora, base, adapters)
    for path in (("proj", "kernel"), ("blocks", "attn", "to_q", "kernel")):
        get = lambda tree: functools.reduce(lambda node, key: node[key], path, tree)  # noqa: E731
        a, b = (np.asarray(get(adapters)[name], np.float64) for name in ("lora_a", "lora_b"))
        want = np.asarray(get(base), np.float64) + 6.0 / 3 * np.einsum("...ir,...ro->...io", a, b)
        np.testing.assert_allclose(get(merged), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["conv"]["kernel"], base["conv"]["kernel"])
    np.testing.assert_array_equal(merged["proj"]["bias"], base["proj"]["bias"])


def test_lora_gradient_matches_finite_differences():
    lora, base = spec(pattern=r"proj/kernel$"), base_params()
    adapters = trainable.init(lora, base, jax.random.key(0))
    adapters["proj"]["kernel"]["lora_b"] = 0.1 * jnp.ones((3, 5))
    x = jnp.linspace(-1.0, 1.0, 8)

    def loss(tree):
        params = trainable.merge(lora, base, tree)
        return jnp.sum(jnp.sin(x @ params["proj"]["kernel"] + params["proj"]["bias"]))

    grads = jax.grad(loss)(adapters)["proj"]["kernel"]
    eps = 1e-2
    for name, index in (("lora_a", (2, 1)), ("lora_b", (0, 4)), ("lora_b", (2, 0))):
        def shifted(sign):
            leaf = adapters["proj"]["kernel"][name]
            moved = {**adapters["proj"]["kernel"], name: leaf.at[index].add(sign * eps)}
            return float(loss({"proj": {"kernel": moved}}))
        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        np.testing.assert_allclose(float(grads[name][index]), numeric, rtol=2e-3, atol=2e-4)


def test_subset_and_full():
    base = base_params()
    subset = spec("subset", r"^/proj/")
    chosen = trainable.init(subset, base, jax.random.key(0))
    assert set(chosen) == {"proj"} and set(chosen["proj"]) == {"kernel", "bias"}
    moved = {"proj": {**chosen["proj"], "kernel": chosen["proj"]["kernel"] + 1}}
    merged = trainable.merge(subset, base, moved)
    np.testing.assert_array_equal(merged["proj"]["kernel"], base["proj"]["kernel"] + 1)
    np.testing.assert_array_equal(merged["conv"]["kernel"], base["conv"]["kernel"])
    full = spec("full")
    assert trainable.init(full, base, jax.random.key(0)) is base and trainable.frozen_base(full, base) == {}
    assert trainable.merge(full, {}, base) is base


def test_subset_with_lora_trains_both_and_merges_each_as_alone():
    base = base_params()
    both = spec("subset+lora", r"^/proj/", lora_pattern=r"to_q/kernel$")
    tree = trainable.init(both, base, jax.random.key(0))
    assert set(traverse_util.flatten_dict(tree)) == {("proj", "kernel"), ("proj", "bias"),
                                                    ("blocks", "attn", "to_q", "kernel", "lora_a"),
                                                    ("blocks", "attn", "to_q", "kernel", "lora_b")}
    rng = np.random.default_rng(2)
    tree = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), tree)
    merged = trainable.merge(both, base, tree)
    np.testing.assert_array_equal(merged["proj"]["kernel"], tree["proj"]["kernel"])
    lora_only = trainable.merge(spec(pattern=r"to_q/kernel$"), base, {"blocks": tree["blocks"]})
    np.testing.assert_array_equal(merged["blocks"]["attn"]["to_q"]["kernel"], lora_only["blocks"]["attn"]["to_q"]["kernel"])
    assert not np.array_equal(merged["blocks"]["attn"]["to_q"]["kernel"], base["blocks"]["attn"]["to_q"]["kernel"])
    np.testing.assert_array_equal(merged["conv"]["kernel"], base["conv"]["kernel"])
    with pytest.raises(ValueError, match=r"both select \['proj/kernel'\]"):
        trainable.init(spec("subset+lora", r"^/proj/", lora_pattern=r"proj/kernel$"), base, jax.random.key(0))


def test_subset_of_a_bf16_base_trains_in_fp32():
    """An Adam-sized step (1e-4) on leaves of order 1 is far below bf16's spacing there (2^-7): a bf16 copy drops
    it; the fp32 master keeps it and the merged model carries it."""
    base = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), base_params())
    subset = spec("subset", r"^/proj/")
    chosen = trainable.init(subset, base, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(chosen)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(chosen["proj"]["kernel"], base["proj"]["kernel"].astype(jnp.float32))
    in_bf16 = base["proj"]["kernel"] + jnp.asarray(1e-4, jnp.bfloat16)
    assert np.mean(np.asarray(in_bf16 == base["proj"]["kernel"])) > 0.9
    stepped = jax.tree.map(lambda leaf: leaf + 1e-4, chosen)
    merged = trainable.merge(subset, base, stepped)
    assert merged["proj"]["kernel"].dtype == jnp.float32 and merged["conv"]["kernel"].dtype == jnp.bfloat16
    assert np.all(np.asarray(merged["proj"]["kernel"]) != np.asarray(base["proj"]["kernel"], np.float32))


def test_bad_specs_are_named():
    with pytest.raises(ValueError, match="train.trainable='qlora'"):
        spec("qlora")
    with pytest.raises(ValueError, match="needs train.trainable_pattern"):
        spec("subset")
    with pytest.raises(ValueError, match="'subset\\+lora' needs train.trainable_pattern"):
        spec("subset+lora")
    with pytest.raises(ValueError, match="LoRA targets are train.lora_pattern"):
        trainable.from_config(ml_collections.ConfigDict({"trainable": "lora", "trainable_pattern": "to_q",
                                                         "lora_pattern": "", "lora_rank": 2, "lora_alpha": 2.0}))
    with pytest.raises(ValueError, match="lora_rank=0"):
        spec(rank=0)
    with pytest.raises(ValueError, match="not a regex"):
        spec(pattern="to_q(")
    with pytest.raises(ValueError, match=r"lora_pattern='nothing_here' matches no denoiser parameter; paths look "
                                         r"like: blocks/"):
        trainable.init(spec(pattern="nothing_here"), base_params(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"conv/kernel has shape \(3, 3, 4, 4\)"):
        trainable.init(spec(pattern="kernel$"), base_params(), jax.random.key(0))


def _adapter_size(lora, shapes) -> int:
    adapters = jax.eval_shape(lambda: trainable.init(lora, shapes, jax.random.key(0)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(adapters))


def _peft_style_size(model, targets, rank) -> int:
    """rank * (in + out) summed over the torch model's nn.Linear layers whose name ends with a target."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(targets))


@pytest.mark.parametrize("family", ["sd15_inpaint", "flux_fill"])
def test_default_targets_on_full_size_configs_match_diffusers_attention_layers(family):
    """The default LoRA covers exactly diffusers' attention projections (peft's usual target_modules)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    lora = spec(rank=16, alpha=16.0)
    if family == "sd15_inpaint":
        modules = sd15_inpaint.build_modules(SD15_UNET, SD15_VAE, SD15_TEXT)
        shapes = jax.eval_shape(lambda: sd15_inpaint.init_params(modules, jax.random.key(0)))["unet"]
        with torch.device("meta"):
            model = UNet2DConditionModel(**SD15_UNET)
        targets = (".to_q", ".to_k", ".to_v", ".to_out.0")
    else:
        config = dict(FLUX_REAL["fill"], num_layers=19, num_single_layers=38, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                      axes_dims_rope=(16, 56, 56))
        shapes = ft.param_shapes(ft.FluxConfig.from_diffusers(config))
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
        targets = (".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj", ".add_v_proj",
                   ".to_add_out")
    assert _adapter_size(lora, shapes) == _peft_style_size(model, targets, 16)
