"""SigLIP vision tower: parity with transformers' SiglipVisionModel on tiny configs (pooled output and last
hidden state), both checkpoint key layouts (transformers 5's unprefixed SiglipVisionModel, the released
SiglipModel's `vision_model.*` with its text tower skipped), key errors, and the full-size parameter count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_inpaint_rl.models.layers import siglip
from jax_inpaint_rl.models.params_io import load_params
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights import calligrapher as convert
from tools.convert_weights import common, flux

CONFIGS = {  # tiny configs: odd sizes, a patch grid that drops pixels (VALID), exact GELU, 1 to 3 layers
    "base": dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=24,
                 patch_size=6),
    "remainder": dict(hidden_size=24, intermediate_size=36, num_hidden_layers=3, num_attention_heads=3, image_size=30,
                      patch_size=7, layer_norm_eps=1e-5),
    "gelu": dict(hidden_size=12, intermediate_size=20, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                 patch_size=4, hidden_act="gelu"),
}
# google/siglip-so400m-patch14-384's vision tower, as transformers counts it
SO400M_PARAMETERS = 428_225_600


def torch_model(name: str, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**CONFIGS[name]))
    with torch.no_grad():
        model.head.probe.normal_()  # transformers initialises the probe; make it count
    return randomize_norms(model.eval())


def pixels(config: siglip.SiglipVisionConfig, batch: int = 2, seed: int = 1) -> np.ndarray:
    size = config.image_size
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def torch_outputs(model, x: np.ndarray):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    return out.pooler_output.numpy(), out.last_hidden_state.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"siglip_{request.param}")
    model = torch_model(request.param)
    model.save_pretrained(folder / "hf")
    component = convert.siglip_component(str(folder / "hf"))
    flux.convert_component(component, str(folder / "out"), "image_encoder")
    assert flux.verify_component(component, str(folder / "out"), "image_encoder") == len(model.state_dict())
    config = siglip.SiglipVisionConfig.from_transformers(component.config)
    return request.param, model, config, load_params(folder / "out" / "params")["image_encoder"]


def test_parity_with_transformers(converted):
    name, model, config, params = converted
    x = pixels(config)
    ref_pooled, ref_hidden = torch_outputs(model, x)
    out = jax.jit(siglip.SiglipVision(config).apply)({"params": params}, jnp.asarray(x))
    assert out["pooled"].shape == ref_pooled.shape and out["last_hidden_state"].shape == ref_hidden.shape
    assert relative_error(out["pooled"], ref_pooled) < 1e-5, name
    assert relative_error(out["last_hidden_state"], ref_hidden) < 1e-5, name
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == config.num_hidden_layers  # one scan


def test_released_siglip_model_layout_reads_its_vision_tower(tmp_path):
    """google/siglip-so400m-patch14-384 is a whole SiglipModel: keys 'vision_model.*' next to a text tower."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = randomize_norms(SiglipModel(SiglipConfig(vision_config=CONFIGS["base"], text_config=text)).eval())
    full.save_pretrained(tmp_path / "hf")
    component = convert.siglip_component(str(tmp_path / "hf"))
    flux.convert_component(component, str(tmp_path / "out"), "image_encoder")
    params = load_params(tmp_path / "out" / "params")["image_encoder"]
    config = siglip.SiglipVisionConfig.from_transformers(component.config)
    x = pixels(config)
    with torch.no_grad():
        ref = full.vision_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
    got = siglip.encode(siglip.SiglipVision(config), params, jnp.asarray(x))
    assert relative_error(got, ref) < 1e-5


def test_bad_keys_are_named(tmp_path):
    from safetensors.numpy import save_file

    model = torch_model("base")
    model.save_pretrained(tmp_path / "hf")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["head.extra.weight"] = np.zeros((2, 2), np.float32)
    del state["head.probe"]
    state["post_layernorm.weight"] = np.zeros(5, np.float32)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(common.ConversionError) as error:
        flux.convert_component(convert.siglip_component(str(tmp_path / "hf")), str(tmp_path / "out"), "image_encoder")
    message = str(error.value)
    assert "head.extra.weight" in message and "head/probe" in message and "post_layernorm.weight" in message
    assert not (tmp_path / "out" / "params" / "image_encoder.safetensors").exists()


def test_config_checks():
    assert siglip.SiglipVisionConfig.from_transformers({"vision_config": {"hidden_size": 48}}).hidden_size == 48
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        siglip.SiglipVisionConfig.from_transformers({"hidden_act": "relu"})
    with pytest.raises(ValueError, match=r"pixels \(1, 8, 8, 3\)"):
        config = siglip.SiglipVisionConfig(**CONFIGS["base"])
        siglip.SiglipVision(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_full_size_parameter_count_matches_transformers():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    fields = {f: getattr(siglip.SO400M, f) for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "image_size", "patch_size")}
    with torch.device("meta"):
        reference = sum(p.numel() for p in SiglipVisionModel(SiglipVisionConfig(**fields)).parameters())
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(siglip.param_shapes(siglip.SO400M)))
    assert ours == reference == SO400M_PARAMETERS
