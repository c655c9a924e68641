"""Qwen2.5-VL language model and the composed VLM: fp32 parity with transformers' Qwen2_5_VLForConditionalGeneration
on tiny models that differ in every language-model knob (qwen_fixtures.VL_CONFIGS): last hidden state and logits for
text batches (right and left padding, uneven lengths) and for prompts holding 1 and 2 images (transformers' own vision
features, and our vision tower on the same patches); rope_index vs get_rope_index; KV-cache decoding vs one full
forward and vs transformers; the converter (both checkpoint layouts give identical params, lm_head optional, every
bad key named); the config layouts; the full-size parameter counts."""
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jax_inpaint_rl.models.params_io import flatten, load_params, read_json
from jax_inpaint_rl.models.qwen_vl import language
from jax_inpaint_rl.models.qwen_vl.model import (QwenVL, QwenVLConfig, decode_positions, param_shapes,
                                                 rope_index)
from tests import qwen_fixtures as qf
from tests.sd15_fixtures import relative_error
from tools.convert_weights import common, qwen_vl

TOLERANCE = 1e-4
PROMPTS = ("a red cat sits on the mat", "describe the sky", "make the text say hello world to the lazy dog")
STEPS = 3  # decode steps after the prefill
TOKENIZER = qf.tiny_tokenizer()
COMPILED = {}  # (model, input shapes) -> compiled forward: the tests are compile-bound on CPU

# Qwen2.5-VL-7B (the text encoder of Qwen-Image / -Edit), counted on the meta device by transformers 5.24
FULL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, hidden_act="silu",
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
FULL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                   out_hidden_size=3584, hidden_act="silu")
LANGUAGE_PARAMETERS = 7_070_619_136  # embed_tokens, 28 layers, norm
LM_HEAD_PARAMETERS = 544_997_376  # 152064 x 3584, untied
FULL_PARAMETERS = 8_292_166_656  # the whole Qwen2_5_VLForConditionalGeneration (vision tower included)


@pytest.fixture(scope="module", params=sorted(qf.VL_CONFIGS))
def converted(request, tmp_path_factory):
    """A tiny transformers model saved and converted with its lm_head: torch model, Flax params, config, folders."""
    folder = tmp_path_factory.mktemp(f"qwen_vl_{request.param}")
    model = qf.save_tiny_vl(folder / "hf", request.param)
    component = qwen_vl.convert_text_encoder(str(folder / "hf"), str(folder / "out"), lm_head=True)
    return SimpleNamespace(name=request.param, torch=model, params=load_params(folder / "out" / "params")[
        "text_encoder"], config=QwenVLConfig.from_transformers(read_json(folder / "hf" / "config.json"),
                                                               request.param),
        hf=folder / "hf", out=folder / "out", component=component)


def tokenize(texts, side: str = "right"):
    TOKENIZER.padding_side = side
    encoded = TOKENIZER(list(texts), padding=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def image_batch(converted, side: str = "right"):
    """Two prompts: the first with 2 images (wide, then small), the second with 1 (tall); uneven lengths."""
    merge = converted.config.spatial_merge_size
    grids = [(1, 2 * merge, 3 * merge), (1, merge, 2 * merge), (1, 3 * merge, merge)]
    tokens = [qf.merged_tokens(converted.torch, grid) for grid in grids]
    ids, mask = tokenize([qf.image_prompt(PROMPTS[0], tokens[:2]), qf.image_prompt(PROMPTS[1], tokens[2:])], side)
    return ids, mask, grids, qf.random_patches(converted.torch, grids)


def flax_forward(converted, ids, mask, positions, features=None, patches=None, grids=None):
    """QwenVL's (last hidden state, logits), compiled once per model and input shapes (backend optimisation off)."""
    model = QwenVL(converted.config, with_lm_head=True)
    grid_thw = None if grids is None else tuple(tuple(g) for g in grids)

    def run(params, ids, positions, mask, features, patches):
        hidden, _ = model.apply({"params": params}, ids, positions, mask, patches, grid_thw, features)
        return hidden, model.apply({"params": params}, hidden, method=QwenVL.logits)

    args = (converted.params, ids, positions, mask, features, patches)
    key = (converted.name, ids.shape, None if features is None else features.shape, grid_thw)
    if key not in COMPILED:
        COMPILED[key] = compile_light(run, *args)
    hidden, logits = COMPILED[key](*args)
    return np.asarray(hidden), np.asarray(logits)


def compile_light(fn, *args):
    """fn compiled once for these argument shapes, XLA's backend optimisation off."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def errors(got, ref, mask) -> tuple[float, float]:
    """Relative errors of (hidden, logits) over the tokens (padding slots are not compared)."""
    valid = mask.astype(bool)
    return relative_error(got[0][valid], ref[0][valid]), relative_error(got[1][valid], ref[1][valid])


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_parity_with_transformers(converted, side):
    ids, mask = tokenize(PROMPTS, side)
    positions, deltas = rope_index(converted.config, ids, mask)
    assert not deltas.any()
    ref = qf.torch_forward(converted.torch, ids, mask)
    got = flax_forward(converted, ids, mask, positions)
    hidden_error, logits_error = errors(got, ref, mask)
    print(f"{converted.name} text, {side} padding: hidden {hidden_error:.2e}, logits {logits_error:.2e}")
    assert max(hidden_error, logits_error) <= TOLERANCE, (converted.name, side, hidden_error, logits_error)
    if side == "left":  # the padding precedes the tokens: attending to it changes them
        unmasked = flax_forward(converted, ids, np.ones_like(mask), positions)
        assert errors(unmasked, ref, mask)[0] > 1e-3


def test_image_parity_with_transformers(converted):
    """Image features from transformers' vision tower, and from ours on the same patches."""
    ids, mask, grids, patches = image_batch(converted)
    positions, _ = rope_index(converted.config, ids, mask, np.array(grids))
    ref = qf.torch_forward(converted.torch, ids, mask, patches, grids)
    features = qf.torch_image_features(converted.torch, patches, grids)
    for source, got in (("transformers' features", flax_forward(converted, ids, mask, positions, features)),
                        ("our vision tower", flax_forward(converted, ids, mask, positions, None, patches, grids))):
        hidden_error, logits_error = errors(got, ref, mask)
        print(f"{converted.name} images, {source}: hidden {hidden_error:.2e}, logits {logits_error:.2e}")
        assert max(hidden_error, logits_error) <= TOLERANCE, (converted.name, source, hidden_error, logits_error)
    # the multimodal positions matter: numbering every token as text changes the result
    text_positions = np.broadcast_to(np.maximum(np.cumsum(mask, axis=1) - 1, 0), positions.shape)
    assert errors(flax_forward(converted, ids, mask, text_positions, features), ref, mask)[0] > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_equals_get_rope_index(converted, side):
    """Rows with 2 images, none and 1, padded unevenly; positions and deltas exactly as transformers'."""
    merge = converted.config.spatial_merge_size
    grids = [(1, 2 * merge, 3 * merge), (1, merge, 2 * merge), (1, 3 * merge, merge)]
    tokens = [qf.merged_tokens(converted.torch, grid) for grid in grids]
    ids, mask = tokenize([qf.image_prompt(PROMPTS[0], tokens[:2]), PROMPTS[2],
                          qf.image_prompt(PROMPTS[1], tokens[2:])], side)
    positions, deltas = rope_index(converted.config, ids, mask, np.array(grids))
    types = torch.from_numpy((ids == converted.config.image_token_id).astype(np.int64))
    ref_positions, ref_deltas = converted.torch.model.get_rope_index(
        torch.from_numpy(ids), types, image_grid_thw=torch.tensor(grids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(positions, ref_positions.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())
    assert deltas[1] == 0 and deltas[0] != 0


def test_rope_index_names_bad_prompts():
    config = QwenVLConfig.from_transformers(json.loads(qf.tiny_vl_config("gqa").to_json_string()))
    ids, mask = tokenize([qf.image_prompt("a cat", [6, 2])])
    with pytest.raises(ValueError, match=r"row 0, image 1: 2 <\|image_pad\|> tokens but grid \(1, 4, 6\) merges "
                                         r"to 6"):
        rope_index(config, ids, mask, np.array([(1, 4, 6), (1, 4, 6)]))
    with pytest.raises(ValueError, match="row 0 holds more images than image_grid_thw's 1 grids"):
        rope_index(config, ids, mask, np.array([(1, 4, 6)]))
    with pytest.raises(ValueError, match="image_grid_thw has 3 grids but the prompts hold 2 images"):
        rope_index(config, ids, mask, np.array([(1, 4, 6), (1, 2, 4), (1, 2, 2)]))
    video, _ = tokenize(["<|vision_start|><|video_pad|><|vision_end|>"])
    with pytest.raises(ValueError, match=f"video tokens \\(id {config.video_token_id}\\); videos are not supported"):
        rope_index(config, video)


def test_kv_cache_decoding(converted):
    """Prefill (2 prompts with images, right- then left-padded) + STEPS one-token steps, each step the same
    compiled program: logits equal one full forward over the same slots, and transformers' on each row's
    unpadded prompt + the new tokens."""
    c = converted.config
    model = QwenVL(c, with_lm_head=True)
    new_tokens = np.random.default_rng(0).integers(0, qf.BPE_VOCAB, (2, STEPS))

    def prefill(params, ids, positions, mask, features, cache):
        hidden, cache = model.apply({"params": params}, ids, positions, mask, image_features=features, cache=cache,
                                    cache_index=0)
        return model.apply({"params": params}, hidden, method=QwenVL.logits), cache

    def step(params, token, position, cache, index):
        hidden, cache = model.apply({"params": params}, token, position, jnp.ones(token.shape, jnp.int32),
                                    cache=cache, cache_index=index)
        return model.apply({"params": params}, hidden, method=QwenVL.logits), cache

    compiled = {}
    for side in ("right", "left"):
        ids, mask, grids, patches = image_batch(converted, side)
        length = ids.shape[1]
        features = qf.torch_image_features(converted.torch, patches, grids)
        positions, deltas = rope_index(c, ids, mask, np.array(grids))
        cache = language.init_cache(c.text, 2, length + STEPS + 2)
        args = (converted.params, ids, positions, mask, features, cache)
        if "prefill" not in compiled:
            compiled["prefill"] = compile_light(prefill, *args)
        prefill_logits, cache = compiled["prefill"](*args)
        lengths, decoded, step_positions = mask.sum(1), [], []
        for k in range(STEPS):
            args = (converted.params, new_tokens[:, k:k + 1], decode_positions(lengths + k, deltas), cache,
                    jnp.int32(length + k))
            if "step" not in compiled:  # one program for every step (and both paddings): the index is traced
                compiled["step"] = compile_light(step, *args)
            logits, cache = compiled["step"](*args)
            decoded.append(np.asarray(logits)[:, 0])
            step_positions.append(np.asarray(args[2]))
        decoded = np.stack(decoded, axis=1)

        full_mask = np.concatenate([mask, np.ones((2, STEPS), mask.dtype)], axis=1)
        full = flax_forward(converted, np.concatenate([ids, new_tokens], axis=1), full_mask,
                            np.concatenate([positions, *step_positions], axis=2), features)[1]
        valid = mask.astype(bool)
        own = max(relative_error(decoded, full[:, length:]),
                  relative_error(np.asarray(prefill_logits)[valid], full[:, :length][valid]))
        assert own <= 1e-5, (side, own)

        rows = [np.concatenate([ids[b][mask[b].astype(bool)], new_tokens[b]]) for b in range(2)]
        width = max(len(r) for r in rows)
        packed = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
        packed_mask = np.stack([np.pad(np.ones(len(r), np.int64), (0, width - len(r))) for r in rows])
        ref = qf.torch_forward(converted.torch, packed, packed_mask, patches, grids)[1]
        ref_steps = np.stack([ref[b, lengths[b]:lengths[b] + STEPS] for b in range(2)])
        error = relative_error(decoded, ref_steps)
        print(f"{converted.name} KV cache, {side} padding: vs one full forward {own:.2e}, decode logits vs "
              f"transformers {error:.2e}")
        assert error <= TOLERANCE, (converted.name, side, error)


def layout_b(state: dict) -> dict:
    """transformers 4.52 - 4.57's key layout: model.language_model.* and model.visual.*."""
    def rename(key):
        if key.startswith("visual."):
            return "model." + key
        return key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key
    return {rename(k): v for k, v in state.items()}


def write_folder(folder, state: dict, config: dict) -> str:
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_checkpoint_layouts_convert_to_identical_params(converted, tmp_path):
    state = load_file(str(converted.hf / "model.safetensors"))
    config = read_json(converted.hf / "config.json")
    tied = converted.config.text.tie_word_embeddings
    if tied:  # some tied checkpoints store the copy: it is dropped
        assert "lm_head.weight" not in state
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = flatten(converted.params)
    for layout, folder in (("model.layers", converted.hf),
                           ("model.language_model.layers", write_folder(tmp_path / "b", layout_b(state), config))):
        component = qwen_vl.convert_text_encoder(str(folder), str(tmp_path / f"out_{layout}"), lm_head=True)
        assert component.layout == layout
        got = flatten(load_params(tmp_path / f"out_{layout}" / "params")["text_encoder"])
        assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected), layout
        assert qwen_vl.verify_text_encoder(component, str(tmp_path / f"out_{layout}")) == len(state) - tied
    assert ("language_model/lm_head/kernel" in expected) != tied
    if not tied:
        np.testing.assert_array_equal(expected["language_model/lm_head/kernel"], state["lm_head.weight"].T)
    layers = converted.config.text.num_hidden_layers
    np.testing.assert_array_equal(expected["language_model/layers/self_attn/k_proj/kernel"][layers - 1],
                                  state[f"model.layers.{layers - 1}.self_attn.k_proj.weight"].T)

    qwen_vl.convert_text_encoder(str(converted.hf), str(tmp_path / "no_head"))  # lm_head=False: the text encoder
    no_head = flatten(load_params(tmp_path / "no_head" / "params")["text_encoder"])
    assert no_head.keys() == expected.keys() - {"language_model/lm_head/kernel"}
    assert json.loads((tmp_path / "no_head" / "text_encoder" / "config.json").read_text()) == config


def test_conversion_errors_name_every_bad_key(tmp_path):
    model = qf.save_tiny_vl(tmp_path / "hf", "gqa")
    config = read_json(tmp_path / "hf" / "config.json")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in state.items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.bias"] = state["model.layers.0.self_attn.k_proj.bias"][:8]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    state["visual.blocks.0.attn.qkv.lora_A.weight"] = np.zeros((2, 2), np.float32)
    src = write_folder(tmp_path / "bad", state, config)
    with pytest.raises(common.ConversionError) as err:
        qwen_vl.convert_text_encoder(src, str(tmp_path / "out"))
    message = str(err.value)
    assert src in message
    assert ("unknown keys (no rule maps them): 2\n    model.layers.0.self_attn.rotary_emb.inv_freq\n"
            "    visual.blocks.0.attn.qkv.lora_A.weight") in message
    assert "missing keys (the model needs them): 1\n    language_model/layers/1/mlp/up_proj/kernel" in message
    assert ("model.layers.0.self_attn.k_proj.bias -> language_model/layers/0/self_attn/k_proj/bias: got (8,), "
            "expected (16,)") in message
    assert not (tmp_path / "out" / "params" / "text_encoder.safetensors").exists(), "partial output left behind"

    del state["lm_head.weight"]
    good = {k: v for k, v in layout_b(state).items() if "lora_A" not in k and "inv_freq" not in k}
    good["model.language_model.layers.0.self_attn.k_proj.bias"] = np.zeros(16, np.float32)
    good["model.language_model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
    src = headless = write_folder(tmp_path / "headless", good, config)
    qwen_vl.convert_text_encoder(src, str(tmp_path / "out"))  # the text encoder needs no lm_head
    with pytest.raises(common.ConversionError, match=r"missing keys \(the model needs them\): 1\n    "
                                                     r"language_model/lm_head/kernel"):
        qwen_vl.convert_text_encoder(src, str(tmp_path / "out"), lm_head=True)

    mixed = dict(good, **{"model.norm.weight": good["model.language_model.norm.weight"],
                          "model.layers.0.input_layernorm.weight": np.ones(32, np.float32)})
    src = write_folder(tmp_path / "mixed", mixed, config)
    with pytest.raises(common.ConversionError, match=r"exactly one of \['model.language_model.layers', "
                                                     r"'model.layers'\]; found \['model.layers', "
                                                     r"'model.language_model.layers'\]"):
        qwen_vl.convert_text_encoder(src, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--dtype 'float8'"):
        qwen_vl.convert_text_encoder(headless, str(tmp_path / "out"), dtype="float8")


def older_configs(config: dict) -> dict[str, dict]:
    """The same model's config.json as transformers 4.52 - 4.57 (text fields flat and in text_config, rope in
    rope_scaling) and as transformers < 4.52 (flat, Qwen's 'mrope' rope_scaling, top-level rope_theta) save it."""
    text = config["text_config"]
    rope = text["rope_parameters"]
    fields = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type", "layer_types")}
    scaling = {"mrope_section": rope["mrope_section"], "rope_type": "default", "type": "default"}
    top = {k: v for k, v in config.items() if k != "text_config"}
    nested = dict(fields, model_type="qwen2_5_vl_text", rope_scaling=scaling, rope_theta=rope["rope_theta"],
                  layer_types=text["layer_types"], image_token_id=None, video_token_id=None,
                  vision_token_id=config["image_token_id"] - 1, torch_dtype="float32",
                  architectures=["Qwen2_5_VLForConditionalGeneration"])
    both = dict(top, **dict(fields, sliding_window=32768), rope_scaling=scaling, rope_theta=rope["rope_theta"],
                text_config=nested, torch_dtype="bfloat16", transformers_version="4.53.1")
    flat = dict(top, **fields, rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                rope_theta=rope["rope_theta"], transformers_version="4.49.0")
    return {"4.53": both, "4.49": flat}


def test_config_layouts_and_errors(tmp_path):
    qf.tiny_vl_config("gqa").save_pretrained(tmp_path)
    config = read_json(tmp_path / "config.json")
    made = QwenVLConfig.from_transformers(config, "tiny")
    assert made.text == language.TextConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                            rope_theta=5000.0, mrope_section=(2, 1, 1), hidden_act="silu")
    assert made.image_token_id == TOKENIZER.convert_tokens_to_ids("<|image_pad|>")
    assert made.spatial_merge_size == 2
    for name, older in older_configs(config).items():
        assert QwenVLConfig.from_transformers(older, name) == made, name
    tied = older_configs(config)["4.53"]
    tied["text_config"] = dict(tied["text_config"], tie_word_embeddings=True)  # 4.55 kept tying in text_config
    assert QwenVLConfig.from_transformers(tied).text.tie_word_embeddings

    text = config["text_config"]
    rope = lambda **kw: dict(config, text_config=dict(  # noqa: E731
        text, rope_parameters=dict(text["rope_parameters"], **kw)))
    bad = [(dict(config, foo=1), r"unknown Qwen2.5-VL config keys \['foo'\]"),
           (dict(config, text_config=dict(text, head_dim=8)), r"unknown Qwen2.5-VL text config keys \['head_dim'\]"),
           (dict(config, hidden_size=64), r"top-level \['hidden_size'\] differ from text_config's \(\[\(64, 32\)\]\)"),
           (dict(config, text_config=dict(text, use_sliding_window=True)), "use_sliding_window=True is not supported"),
           (rope(rope_type="yarn"), "rope type 'yarn' is not supported"),
           (rope(mrope_section=[2, 2, 1]), r"mrope_section \(2, 2, 1\) must be 3 sizes summing to head_dim / 2 = 4"),
           (dict(config, text_config=dict(text, num_key_value_heads=3)),
            "num_attention_heads 4 must be a multiple of num_key_value_heads 3"),
           ({k: v for k, v in config.items() if k != "vision_config"}, "no vision_config")]
    for value, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            QwenVLConfig.from_transformers(value, "tiny")


def test_bad_inputs_are_named():
    config = QwenVLConfig.from_transformers(json.loads(qf.tiny_vl_config("gqa").to_json_string()))
    lm = language.QwenLM(config.text)
    params = jax.eval_shape(lambda: language.init_params(config.text, jax.random.key(0)))
    call = lambda *a, **kw: jax.eval_shape(lambda p: lm.apply({"params": p}, *a, **kw), params)  # noqa: E731
    embeds, positions, mask = jnp.zeros((2, 5, 32)), jnp.zeros((3, 2, 5), jnp.int32), jnp.ones((2, 5))
    with pytest.raises(ValueError, match=r"positions \(2, 5\): expected \(3, 2, 5\)"):
        call(embeds, positions[0], mask)
    with pytest.raises(ValueError, match=r"attention_mask \(2, 4\): expected \(2, 5\)"):
        call(embeds, positions, mask[:, :4])
    with pytest.raises(ValueError, match="cache and cache_index go together"):
        call(embeds, positions, mask, cache=language.init_cache(config.text, 2, 8))
    with pytest.raises(ValueError, match=r"cache key / value \(2, 1, 8, 2, 8\) / .*: expected \(2, 2, 8, 2, 8\)"):
        call(embeds, positions, mask, cache=language.init_cache(config.text, 1, 8), cache_index=0)
    with pytest.raises(ValueError, match="cache_index 4 \\+ 5 tokens does not fit the cache's 8 slots"):
        call(embeds, positions, mask, cache=language.init_cache(config.text, 2, 8), cache_index=4)
    with pytest.raises(ValueError, match="has no lm_head"):
        jax.eval_shape(lambda p: lm.apply({"params": p}, embeds, method=language.QwenLM.logits), params)
    vl = QwenVL(config)
    vl_params = param_shapes(config)
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"image_features \(3, 16\): expected \(n, 32\)"):
        jax.eval_shape(lambda p: vl.apply({"params": p}, ids, positions, mask, image_features=jnp.zeros((3, 16))),
                       vl_params)
    with pytest.raises(ValueError, match="patches and grid_thw go together"):
        jax.eval_shape(lambda p: vl.apply({"params": p}, ids, positions, mask, patches=jnp.zeros((4, 96))), vl_params)


def test_remat_rematerialises():
    config = QwenVLConfig.from_transformers(json.loads(qf.tiny_vl_config("mqa").to_json_string()))
    params = jax.eval_shape(lambda: language.init_params(config.text, jax.random.key(0)))
    inputs = language.example_inputs(config.text)
    lm = language.QwenLM(config.text, remat=True)
    loss = lambda p: jnp.sum(lm.apply({"params": p}, jnp.zeros((1, 2, 64)), inputs["positions"],  # noqa: E731
                                      inputs["attention_mask"])[0])
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_tokenizer_fixture(tmp_path):
    """Qwen's special tokens are single tokens with the config's ids; the folder reloads as Qwen2TokenizerFast."""
    from transformers import AutoTokenizer

    qf.tiny_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2Tokenizer" and len(loaded) == qf.BPE_VOCAB + 1 + len(qf.SPECIAL_TOKENS)
    ids = loaded(qf.image_prompt("a red cat", [3]))["input_ids"]
    config = qf.tiny_vl_config("mha")
    assert ids.count(config.image_token_id) == 3 and config.vision_start_token_id in ids
    assert loaded.decode(ids) == qf.image_prompt("a red cat", [3])
    assert all(config.text_config.vocab_size >= len(loaded) for config in map(qf.tiny_vl_config, qf.VL_CONFIGS))


def test_full_size_parameter_counts_match_transformers():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_config = Qwen2_5_VLConfig(text_config=FULL_TEXT, vision_config=FULL_VISION, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.model.language_model) == LANGUAGE_PARAMETERS
    assert count(model.lm_head) == LM_HEAD_PARAMETERS
    assert count(model) == FULL_PARAMETERS

    config = QwenVLConfig.from_transformers(json.loads(hf_config.to_json_string()), "7B")
    leaves = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert leaves(language.param_shapes(config.text)) == LANGUAGE_PARAMETERS
    assert leaves(language.param_shapes(config.text, lm_head=True)) == LANGUAGE_PARAMETERS + LM_HEAD_PARAMETERS
    assert leaves(param_shapes(config, lm_head=True)) == FULL_PARAMETERS
