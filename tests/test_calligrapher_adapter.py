"""Calligrapher's adapter: the image projection (MLP, Q-Former) and the Flux transformer with image-prompt
attention against a torch reference of the same math built on diffusers' FluxTransformer2DModel (the reference
processor, in tools/convert_weights/calligrapher_torch.py, is written from the published facts, not copied), on
tiny configs including non-square canvases with the context strip; the adapter .bin converter in its three key
layouts and our export's bit-exact reload; and the full-size parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_inpaint_rl.models.calligrapher import adapter as adapter_lib
from jax_inpaint_rl.models.calligrapher.adapter import AdapterConfig
from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.params_io import load_params
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights import calligrapher as convert
from tools.convert_weights import common
from tools.convert_weights import flux as flux_convert
from tools.convert_weights.calligrapher_torch import (IPAttnProcessor, TorchMLPProjection, TorchQFormerProjection,
                                                      attach_processors)

# --- the torch reference (its modules: tools/convert_weights/calligrapher_torch.py) ---------------------------

def adapter_state(mlp, qformer, processors, layout: str) -> dict:
    """The torch adapter as each layout stores it."""
    attention = {k: v.clone() for k, v in torch.nn.ModuleList(processors).state_dict().items()}
    mlp_state = {k: v.clone() for k, v in mlp.state_dict().items()}
    if layout == "released":
        return {"image_proj_mlp": mlp_state, "image_proj_qformer": dict(qformer.state_dict()),
                "attn_adapter": attention}
    if layout == "legacy":
        return {"image_proj_mlp": mlp_state, "attn_adapter": attention}
    state = {"image_proj": mlp_state, "ip_adapter": attention}
    if qformer is not None:
        state["image_proj_qformer"] = dict(qformer.state_dict())
    return state


# --- tiny configs -------------------------------------------------------------------------------------------

BATCH, TEXT_LEN = 2, 5
CONFIGS = {  # name -> (Flux config, adapter config, canvas grid (rows = strip + image, cols), strip rows)
    "square_strip": (dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), in_channels=384,
                          out_channels=64, guidance_embeds=True),
                     AdapterConfig(num_tokens=4, image_embed_dim=12, qformer_heads=2, qformer_query_tokens=3),
                     (6, 3), 3),
    "wide_source": (dict(num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
                         joint_attention_dim=24, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), in_channels=48,
                         out_channels=16, guidance_embeds=True),
                    AdapterConfig(num_tokens=5, image_embed_dim=10, qformer_heads=4, qformer_query_tokens=2,
                                  ip_scale=0.7),
                    (7, 4), 4),  # 4-row strip over a 3 x 4 source (wider than tall)
    "tall_source_mlp_only": (dict(num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
                                  in_channels=64, guidance_embeds=False),
                             AdapterConfig(num_tokens=3, image_embed_dim=8, use_qformer=False, ip_scale=1.3),
                             (7, 2), 2),  # 2-row strip over a 5 x 2 source (taller than wide)
}


def torch_adapter(name: str, seed: int = 0):
    """(diffusers transformer with IP processors, mlp, qformer or None, processors), random and seeded."""
    from diffusers import FluxTransformer2DModel

    config, adapter, _, _ = CONFIGS[name]
    torch.manual_seed(seed)
    transformer = randomize_norms(FluxTransformer2DModel(**config).eval())
    width = config["joint_attention_dim"]
    mlp = randomize_norms(TorchMLPProjection(adapter.image_embed_dim, width, adapter.num_tokens))
    qformer = (randomize_norms(TorchQFormerProjection(adapter.image_embed_dim, width, adapter.num_tokens,
                                                      adapter.qformer_heads, adapter.qformer_query_tokens))
               if adapter.use_qformer else None)
    return transformer, mlp, qformer


def canvas_ids(rows: int, cols: int) -> np.ndarray:
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(rows)[:, None], np.arange(cols)[None, :]
    return ids.reshape(-1, 3)


_CONVERTED = {}


def build_converted(name: str, tmp_path_factory):
    """name, torch pieces, and our params converted by the tools (transformer: flux converter; adapter: .bin);
    built once per config."""
    if name not in _CONVERTED:
        _CONVERTED[name] = _convert(name, tmp_path_factory.mktemp(f"calligrapher_{name}"))
    return _CONVERTED[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    return build_converted(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    return build_converted("square_strip", tmp_path_factory)


def _convert(name: str, folder):
    config, adapter, _, _ = CONFIGS[name]
    transformer, mlp, qformer = torch_adapter(name)
    transformer.save_pretrained(folder / "transformer")  # before the processors: plain diffusers keys
    processors = attach_processors(transformer, config["joint_attention_dim"], adapter.ip_scale)
    torch.save(adapter_state(mlp, qformer, processors, "released" if qformer is not None else "legacy"),
               folder / "adapter.bin")
    flux_convert.convert_component(flux_convert.transformer_component(str(folder / "transformer")), str(folder / "out"),
                                   "transformer")
    written = convert.convert_adapter(str(folder / "adapter.bin"), str(folder / "out"), dict(transformer.config),
                                      ip_scale=adapter.ip_scale, qformer_heads=adapter.qformer_heads)
    params = load_params(folder / "out" / "params")
    assert AdapterConfig.from_dict(written) == adapter
    return name, (transformer, mlp, qformer), params


def test_image_projection_matches_torch(converted):
    name, (_, mlp, qformer), params = converted
    config, adapter, _, _ = CONFIGS[name]
    embeds = np.random.default_rng(3).standard_normal((BATCH, adapter.image_embed_dim)).astype(np.float32)
    with torch.no_grad():
        ref = mlp(torch.from_numpy(embeds)) + (qformer(torch.from_numpy(embeds)) if qformer is not None else 0)
    projection = adapter_lib.ImageProjection(adapter, config["joint_attention_dim"])
    got = projection.apply({"params": params["image_proj"]}, jnp.asarray(embeds))
    assert got.shape == (BATCH, adapter.num_tokens, config["joint_attention_dim"])
    assert relative_error(got, ref.numpy()) < 1e-5, name
    assert ("qformer" in params["image_proj"]) == adapter.use_qformer


def transformer_inputs(name: str, seed: int = 1) -> dict:
    config, adapter, (rows, cols), _ = CONFIGS[name]
    rng = np.random.default_rng(seed)
    return dict(hidden=rng.standard_normal((BATCH, rows * cols, config["in_channels"])).astype(np.float32),
                text=rng.standard_normal((BATCH, TEXT_LEN, config["joint_attention_dim"])).astype(np.float32),
                pooled=rng.standard_normal((BATCH, config["pooled_projection_dim"])).astype(np.float32),
                timestep=np.array([0.9, 0.31], np.float32),
                img_ids=canvas_ids(rows, cols), txt_ids=np.zeros((TEXT_LEN, 3), np.float32),
                guidance=np.full((BATCH,), 30.0, np.float32) if config["guidance_embeds"] else None,
                ip_tokens=rng.standard_normal((BATCH, adapter.num_tokens,
                                               config["joint_attention_dim"])).astype(np.float32))


def torch_transformer_forward(transformer, inputs, with_ip: bool = True) -> np.ndarray:
    t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
    kwargs = {"image_emb": t(inputs["ip_tokens"])} if with_ip else None
    with torch.no_grad():
        return transformer(hidden_states=t(inputs["hidden"]), encoder_hidden_states=t(inputs["text"]),
                           pooled_projections=t(inputs["pooled"]), timestep=t(inputs["timestep"]),
                           img_ids=t(inputs["img_ids"]), txt_ids=t(inputs["txt_ids"]), guidance=t(inputs["guidance"]),
                           joint_attention_kwargs=kwargs).sample.numpy()


def flax_transformer(name: str, params, inputs, dtype=jnp.float32, remat: bool = False, ip_scale=None):
    config, adapter, _, _ = CONFIGS[name]
    if ip_scale is not None:
        adapter = AdapterConfig(**{**adapter.__dict__, "ip_scale": ip_scale})
    model = adapter_lib.IPFluxTransformer(ft.FluxConfig.from_diffusers(config), adapter, dtype, remat)
    tree = adapter_lib.join_ip(params["transformer"], params["ip_attention"])
    arrays = {k: None if v is None else jnp.asarray(v) for k, v in inputs.items() if k != "ip_tokens"}
    return np.asarray(jax.jit(model.apply)({"params": tree}, **arrays, extra=(jnp.asarray(inputs["ip_tokens"]),)),
                      np.float32)


def test_ip_attention_blocks_match_torch(converted):
    name, (transformer, _, _), params = converted
    inputs = transformer_inputs(name)
    ref = torch_transformer_forward(transformer, inputs)
    got = flax_transformer(name, params, inputs)
    error = relative_error(got, ref)
    assert got.shape == ref.shape and error < 1e-4, (name, error)
    # the image-prompt term matters: without it (scale 0) the output is Flux's and differs
    plain = flax_transformer(name, params, inputs, ip_scale=0.0)
    assert relative_error(plain, ref) > 1e-2
    flux_only = np.asarray(jax.jit(ft.FluxTransformer(ft.FluxConfig.from_diffusers(CONFIGS[name][0])).apply)(
        {"params": params["transformer"]}, **{k: None if v is None else jnp.asarray(v) for k, v in inputs.items()
                                              if k != "ip_tokens"}))
    np.testing.assert_allclose(plain, flux_only, rtol=0, atol=1e-5 * np.abs(flux_only).max())


def test_ip_kernels_are_stacked_in_release_order(converted):
    name, (transformer, _, _), params = converted
    config = CONFIGS[name][0]
    processors = list(transformer.attn_processors.values())
    last_double, first_single = processors[config["num_layers"] - 1], processors[config["num_layers"]]
    ip = params["ip_attention"]
    assert ip["double"]["to_k_ip"]["kernel"].shape[0] == config["num_layers"]
    assert ip["single"]["to_v_ip"]["kernel"].shape[0] == config["num_single_layers"]
    np.testing.assert_array_equal(ip["double"]["to_k_ip"]["kernel"][-1], last_double.to_k_ip.weight.detach().numpy().T)
    np.testing.assert_array_equal(ip["single"]["to_v_ip"]["kernel"][0], first_single.to_v_ip.weight.detach().numpy().T)


def test_remat_bf16_and_gradients(square):
    name, (transformer, _, _), params = square
    inputs = transformer_inputs(name)
    ref = torch_transformer_forward(transformer, inputs)
    assert relative_error(flax_transformer(name, params, inputs, remat=True), ref) < 1e-4
    assert relative_error(flax_transformer(name, params, inputs, jnp.bfloat16), ref) < 5e-2
    config, adapter, _, _ = CONFIGS[name]
    model = adapter_lib.IPFluxTransformer(ft.FluxConfig.from_diffusers(config), adapter, remat=True)
    arrays = {k: None if v is None else jnp.asarray(v) for k, v in inputs.items() if k != "ip_tokens"}
    extra = (jnp.asarray(inputs["ip_tokens"]),)

    def loss(ip):
        return jnp.sum(model.apply({"params": adapter_lib.join_ip(params["transformer"], ip)}, **arrays,
                                   extra=extra) ** 2)

    grads = jax.grad(loss)(params["ip_attention"])
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)), "every ip kernel gets a gradient"


# --- the .bin layouts: load, export, reload ---------------------------------------------------------------

def random_torch_adapter(name: str, seed: int):
    config, adapter, _, _ = CONFIGS[name]
    transformer, mlp, qformer = torch_adapter(name, seed)
    processors = attach_processors(transformer, config["joint_attention_dim"], seed=seed + 1)
    return transformer, mlp, qformer, processors


def flat(state: dict) -> dict:
    return {f"{section}.{key}": value for section, tensors in state.items() for key, value in tensors.items()}


@pytest.mark.parametrize("layout", ["released", "standard", "legacy"])
def test_every_layout_loads_and_our_export_reloads_bit_exactly(layout, tmp_path):
    name = "square_strip"
    transformer, mlp, qformer, processors = random_torch_adapter(name, seed=5)
    if layout == "legacy":
        qformer = None
    state = adapter_state(mlp, qformer, processors, layout)
    torch.save(state, tmp_path / "in.bin")
    config = dict(transformer.config)
    convert.convert_adapter(str(tmp_path / "in.bin"), str(tmp_path / "a"), config)
    first = load_params(tmp_path / "a" / "params")
    np.testing.assert_array_equal(first["image_proj"]["mlp"]["proj_2"]["kernel"],
                                  mlp.proj[2].weight.detach().numpy().T)
    assert ("qformer" in first["image_proj"]) == (qformer is not None)
    export_layout = "legacy" if layout == "legacy" else layout
    path = convert.export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), layout=export_layout)
    assert path.endswith("ip-adapter.bin")
    exported = torch.load(path, weights_only=True)
    assert flat(exported).keys() == flat(state).keys()
    for key, value in flat(state).items():
        assert torch.equal(flat(exported)[key], value), key
    convert.convert_adapter(path, str(tmp_path / "b"), config)
    second = load_params(tmp_path / "b" / "params")
    jax.tree.map(np.testing.assert_array_equal, first, second)
    # the standard export of a Q-Former model keeps image_proj_qformer beside what the seeds' loader reads
    standard = torch.load(convert.export_adapter(str(tmp_path / "a"), str(tmp_path / "std.bin")), weights_only=True)
    assert set(standard) == {"image_proj", "ip_adapter"} | ({"image_proj_qformer"} if qformer is not None else set())
    assert set(standard["ip_adapter"]) == set(state[{"standard": "ip_adapter"}.get(layout, "attn_adapter")])


def test_bfloat16_files_round_trip_and_no_qformer(tmp_path):
    transformer, mlp, qformer, processors = random_torch_adapter("square_strip", seed=7)
    state = {section: {k: v.to(torch.bfloat16) for k, v in tensors.items()}
             for section, tensors in adapter_state(mlp, qformer, processors, "released").items()}
    torch.save(state, tmp_path / "in.bin")
    convert.convert_adapter(str(tmp_path / "in.bin"), str(tmp_path / "a"), dict(transformer.config), dtype="bfloat16")
    exported = torch.load(convert.export_adapter(str(tmp_path / "a"), str(tmp_path / "x.bin"), layout="released"),
                          weights_only=True)
    for key, value in flat(state).items():
        assert flat(exported)[key].dtype == torch.bfloat16 and torch.equal(flat(exported)[key], value), key
    written = convert.convert_adapter(str(tmp_path / "in.bin"), str(tmp_path / "mlp"), dict(transformer.config),
                                      no_qformer=True)
    assert written["use_qformer"] is False
    assert "qformer" not in load_params(tmp_path / "mlp" / "params")["image_proj"]


def test_missing_and_unknown_keys_are_named(tmp_path):
    transformer, mlp, qformer, processors = random_torch_adapter("square_strip", seed=9)
    config = dict(transformer.config)
    state = adapter_state(mlp, qformer, processors, "released")
    del state["attn_adapter"]["3.to_v_ip.weight"]  # layer 3 = the second single block of this config
    del state["image_proj_qformer"]["cross_attn.in_proj_bias"]
    state["attn_adapter"]["57.to_k_ip.weight"] = torch.zeros(2, 2)
    state["image_proj_mlp"]["norm.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(common.ConversionError) as error:
        convert.convert_adapter(str(tmp_path / "bad.bin"), str(tmp_path / "out"), config)
    message = str(error.value)
    for expected in ("ip_attention/single/1/to_v_ip/kernel", "image_proj/qformer/cross_attn/in_proj/bias",
                     "attn_adapter.57.to_k_ip.weight", "image_proj_mlp.norm.bias: shape (3,), expected (32,)"):
        assert expected in message, expected
    assert not (tmp_path / "out" / "params").exists(), "nothing is written when a key is wrong"
    torch.save({"image_proj": {}, "weights": {}}, tmp_path / "odd.bin")
    with pytest.raises(common.ConversionError, match=r"section 'weights' is not part of the standard layout.*"
                                                     r"section 'ip_adapter' missing"):
        convert.convert_adapter(str(tmp_path / "odd.bin"), str(tmp_path / "out"), config)
    torch.save({"unet": {}}, tmp_path / "other.bin")
    with pytest.raises(common.ConversionError, match=r"not a Calligrapher / IP-Adapter file.*\['unet'\]"):
        convert.convert_adapter(str(tmp_path / "other.bin"), str(tmp_path / "out"), config)


# --- full size -----------------------------------------------------------------------------------------------

FLUX_FILL = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), in_channels=384,
                 out_channels=64, guidance_embeds=True)


def test_full_size_adapter_counts():
    config = ft.FluxConfig.from_diffusers(FLUX_FILL)
    shapes = adapter_lib.param_shapes(config, AdapterConfig())
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    mlp, qformer = count(shapes["image_proj"]["mlp"]), count(shapes["image_proj"]["qformer"])
    ip = count(shapes["ip_attention"])
    assert (mlp, qformer, ip) == (1_211_148_544, 372_443_392, 1_434_451_968)
    assert mlp + qformer + ip == 3_018_043_904
    with torch.device("meta"):  # the torch reference counts the same
        assert sum(p.numel() for p in TorchMLPProjection(1152, 4096, 128).parameters()) == mlp
        assert sum(p.numel() for p in TorchQFormerProjection(1152, 4096, 128, 8, 32).parameters()) == qformer
        assert 57 * sum(p.numel() for p in IPAttnProcessor(4096, 3072).parameters()) == ip
    # the Flux part of the image-prompt transformer is exactly FLUX.1 Fill's tree
    model = adapter_lib.IPFluxTransformer(config, AdapterConfig())
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), **ft.example_inputs(config),
                                             extra=(adapter_lib.example_tokens(config, AdapterConfig()),))["params"])
    flux_part, _ = adapter_lib.split_ip(tree)
    same = jax.tree.map(lambda a, b: a.shape == b.shape, flux_part, ft.param_shapes(config))
    assert all(jax.tree.leaves(same)) and count(flux_part) == 11_902_391_360
