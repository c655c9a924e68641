"""CLIP text towers with projection (transformers' CLIPTextModelWithProjection, SD3's CLIP-L and CLIP-G):
parity of the last and penultimate hidden states and of text_embeds after the SD3 converter's CLIP table;
a plain CLIPTextModel keeps its outputs and parameters, and the SD3 converter refuses it."""
import jax
import numpy as np
import pytest
import torch

from jax_inpaint_rl.models.layers import clip_text
from jax_inpaint_rl.models.params_io import load_params
from tests.sd15_fixtures import randomize_norms, relative_error, run_compiled
from tools.convert_weights import flux, sd3

TINY = dict(vocab_size=58, max_position_embeddings=12, layer_norm_eps=1e-5)
CONFIGS = {  # CLIP-L-like (legacy EOS: the largest id) and CLIP-G-like (exact gelu, explicit EOS id)
    "clip_l": dict(TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   projection_dim=16, hidden_act="quick_gelu", eos_token_id=2),
    "clip_g": dict(TINY, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=20, hidden_act="gelu", eos_token_id=57),
}


def save_tiny(folder, name: str, projection: bool = True, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = randomize_norms(model_class(CLIPTextConfig(**CONFIGS[name])).eval())
    model.save_pretrained(folder)
    return model


def prompt_ids(config: clip_text.CLIPTextConfig) -> np.ndarray:
    rng = np.random.default_rng(3)
    ids = rng.integers(3, config.vocab_size - 3, (2, config.max_position_embeddings))
    eos = config.vocab_size - 1 if config.eos_token_id == 2 else config.eos_token_id
    ids[0, 5:], ids[1, -1] = eos, eos  # pooled position: early, last
    return ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_projection_model_matches_transformers(name, tmp_path):
    model = save_tiny(tmp_path / "src", name)
    component = sd3.clip_component(str(tmp_path / "src"))
    flux.convert_component(component, str(tmp_path / "out"), "text_encoder")
    params = load_params(tmp_path / "out" / "params")["text_encoder"]
    config = clip_text.CLIPTextConfig.from_transformers(component.config)
    assert config.projection_dim == CONFIGS[name]["projection_dim"]
    ids = prompt_ids(config)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    got = run_compiled(clip_text.CLIPTextTransformer(config).apply, {"params": params}, ids.astype(np.int32))
    assert relative_error(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-5
    assert relative_error(got["penultimate_hidden_state"], ref.hidden_states[-2].numpy()) <= 1e-5
    assert relative_error(got["text_embeds"], ref.text_embeds.numpy()) <= 1e-5
    np.testing.assert_array_equal(params["text_projection"]["kernel"], model.text_projection.weight.detach().numpy().T)


def test_plain_clip_has_no_projection_and_is_refused_by_sd3(tmp_path):
    model = save_tiny(tmp_path / "plain", "clip_l", projection=False)
    config = clip_text.CLIPTextConfig.from_transformers(model.config.to_dict())
    assert config.projection_dim is None  # every CLIPTextConfig has a projection_dim; only the architecture counts
    flax_text = clip_text.CLIPTextTransformer(config)
    params = jax.eval_shape(lambda: clip_text.init_params(flax_text, jax.random.key(0)))
    assert "text_projection" not in params
    out = jax.eval_shape(flax_text.apply, {"params": params}, prompt_ids(config).astype(np.int32))
    assert sorted(out) == ["last_hidden_state", "penultimate_hidden_state", "pooled"]
    with pytest.raises(ValueError, match=r"plain: architectures \['CLIPTextModel'\]; SD3 needs a "
                                         "CLIPTextModelWithProjection"):
        sd3.clip_component(str(tmp_path / "plain"))
