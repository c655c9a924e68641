"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, relative-position buckets, converter, tokenizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jax_inpaint_rl.models.layers import t5
from jax_inpaint_rl.models.params_io import load_params
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights import common
from tools.convert_weights import flux as convert

CONFIGS = {
    "small_buckets": dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "inner_ne_model": dict(vocab_size=80, d_model=24, d_kv=10, d_ff=40, num_layers=3, num_heads=3),
}


def torch_t5(config: dict, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return randomize_norms(T5EncoderModel(T5Config(**config, feed_forward_proj="gated-gelu")).eval())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"t5_{request.param}")
    model = torch_t5(CONFIGS[request.param])
    model.save_pretrained(folder / "hf")
    convert.convert_component(convert.t5_component(str(folder / "hf")), str(folder / "out"), "text_encoder_2")
    return model, load_params(folder / "out" / "params")["text_encoder_2"], folder


def test_parity_with_transformers(converted):
    model, params, _ = converted
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 40))  # > max_distance: log buckets
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    config = t5.T5Config.from_transformers(model.config.to_dict())
    got = t5.T5Encoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert relative_error(got, ref) < 1e-4
    assert params["blocks"]["q"]["kernel"].shape[0] == config.num_layers


def test_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in ((32, 128), (8, 16)):
        relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
        ref = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(300, buckets, distance), ref)


def test_tied_embedding_copy_is_accepted(converted, tmp_path):
    model, params, folder = converted
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text((folder / "hf" / "config.json").read_text())
    convert.convert_component(convert.t5_component(str(tmp_path / "hf")), str(tmp_path / "out"), "text_encoder_2")
    np.testing.assert_array_equal(load_params(tmp_path / "out" / "params")["text_encoder_2"]["embed_tokens"]
                                  ["embedding"], params["embed_tokens"]["embedding"])
    del state["shared.weight"], state["encoder.final_layer_norm.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))  # only the tied copy, final norm missing
    with pytest.raises(common.ConversionError, match="final_norm/scale"):
        convert.convert_component(convert.t5_component(str(tmp_path / "hf")), str(tmp_path / "out2"),
                                  "text_encoder_2")


def test_tokenizer_pads_and_ends_like_the_pipeline(tmp_path):
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        ("\u2581" + w, -1.0 - i) for i, w in enumerate("a photo of cat sign".split())]
    T5TokenizerFast(vocab=vocab + [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"], extra_ids=0).save_pretrained(
        tmp_path)
    tokenizer = t5.load_tokenizer(tmp_path)
    ids = t5.tokenize(tokenizer, ["a photo of a cat", "sign " * 20], max_length=8)
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    np.testing.assert_array_equal(ids[0], [3, 4, 5, 3, 6, 1, 0, 0])  # words, </s>, <pad>...
    assert ids[1, -1] == 1  # truncated, still ends with </s>
    with pytest.raises(FileNotFoundError, match="no_tokenizer_here"):
        t5.load_tokenizer(tmp_path / "no_tokenizer_here")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="only T5 v1.1"):
        t5.T5Config.from_transformers({"feed_forward_proj": "relu"}, "t5/config.json")
    config = t5.T5Config(**{k: v for k, v in CONFIGS["small_buckets"].items()})
    with pytest.raises(ValueError, match=r"token ids \(5,\): expected \(batch, length\)"):
        t5.T5Encoder(config).init(jax.random.key(0), jnp.zeros((5,), jnp.int32))
