"""The VLM policy's sampler (vlm_policy/sampling.py) on three tiny Qwen2.5-VL configs converted from transformers
(fp32, with images, right-padded prompts of uneven lengths): the KV-cache decode's logits equal one full forward
over the same tokens; the recorded log-probs equal transformers' log_softmax(logits / T) on each row's unpadded
prompt + completion; the first GRPO ratio is exactly 1 per token; <|im_end|> stops a row; one compile; greedy
decoding takes the argmax."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.models.params_io import load_params, read_json
from jax_inpaint_rl.models.qwen_vl.model import QwenVL, QwenVLConfig, rope_index
from jax_inpaint_rl.vlm_policy import sampling, update
from tests import qwen_fixtures as qf
from tests.sd15_fixtures import relative_error
from tools.convert_weights import qwen_vl

pytestmark = pytest.mark.slow  # compile-bound (sampling / update programs): CI's second stage

TOLERANCE = 1e-4
STEPS = 5
TEMPERATURE = 0.9
TOKENIZER = qf.tiny_tokenizer()
INSTRUCTIONS = ("make the text say hello world to the lazy dog", "a red cat")


@pytest.fixture(scope="module", params=sorted(qf.VL_CONFIGS))
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"vlm_policy_{request.param}")
    model = qf.save_tiny_vl(folder / "hf", request.param)
    qwen_vl.convert_text_encoder(str(folder / "hf"), str(folder / "out"), lm_head=True)
    config = QwenVLConfig.from_transformers(read_json(folder / "hf" / "config.json"), request.param)
    vlm = QwenVL(config, with_lm_head=True)
    return SimpleNamespace(name=request.param, torch=model, config=config, vlm=vlm,
                           params=load_params(folder / "out" / "params")["text_encoder"],
                           end_id=TOKENIZER.convert_tokens_to_ids("<|im_end|>"))


def prompts_for(converted):
    """Two chat prompts with one image each, right-padded to uneven lengths, and their patches / grids."""
    merge = converted.config.spatial_merge_size
    grids = [(1, 2 * merge, 2 * merge), (1, 2 * merge, 2 * merge)]
    tokens = qf.merged_tokens(converted.torch, grids[0])
    texts = ["<|im_start|>system\ndescribe the picture<|im_end|>\n" + qf.image_prompt(text, [tokens])
             + "\n<|im_start|>assistant\n" for text in INSTRUCTIONS]
    TOKENIZER.padding_side = "right"
    encoded = TOKENIZER(texts, padding=True, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)
    assert mask.sum(1)[0] != mask.sum(1)[1]
    positions, _ = rope_index(converted.config, ids, mask, np.array(grids))
    patches = qf.random_patches(converted.torch, grids)
    features = sampling.vision_features(converted.vlm, converted.params, jnp.asarray(patches)[None],
                                        tuple(grids))
    return sampling.Prompts(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions), features), patches, grids


def sample(converted, prompts, end_id, key=0, return_logits=True):
    sampler = make(converted, end_id, return_logits)
    return sampler(converted.params, {}, prompts, jax.random.key(key))


SAMPLERS = {}


def make(converted, end_id, return_logits=True):
    key = (converted.name, end_id, return_logits)
    if key not in SAMPLERS:
        SAMPLERS[key] = sampling.make_sampler(
            converted.vlm, lambda base, trainable: base, max_new_tokens=STEPS, temperature=TEMPERATURE,
            end_id=end_id, return_logits=return_logits)
    return SAMPLERS[key]


def test_kv_cache_decode_equals_a_full_forward(converted):
    prompts, _, _ = prompts_for(converted)
    out = sample(converted, prompts, converted.end_id)
    ids, mask, positions = sampling.sequence_inputs(prompts, out.tokens, out.mask, converted.end_id)
    hidden, _ = converted.vlm.apply({"params": converted.params}, ids, positions, mask,
                                    image_features=prompts.image_features)
    lengths = np.asarray(prompts.mask).sum(1)
    length = prompts.ids.shape[1]
    slots = np.concatenate([lengths[:, None] - 1, np.broadcast_to(length + np.arange(STEPS - 1), (2, STEPS - 1))], 1)
    full = converted.vlm.apply({"params": converted.params}, jnp.take_along_axis(hidden, slots[..., None], 1),
                               method=QwenVL.logits)
    full = np.asarray(sampling.policy_logits(full, sampling.banned_ids(converted.vlm)))
    valid = np.asarray(out.mask).astype(bool)
    finite = np.isfinite(full)
    decoded = np.asarray(out.logits)
    assert np.array_equal(finite, np.isfinite(decoded))
    error = relative_error(decoded[valid][finite[valid]], full[valid][finite[valid]])
    drift = np.abs(np.asarray(out.decode_log_probs) - np.asarray(out.log_probs))[valid].max()
    print(f"{converted.name}: KV-cache decode logits vs a full forward {error:.2e}; decode vs scorer log-probs "
          f"{drift:.2e}")
    assert error <= 1e-5, error
    assert drift <= 1e-4, drift


def test_log_probs_equal_transformers(converted):
    prompts, patches, grids = prompts_for(converted)
    out = sample(converted, prompts, converted.end_id)
    ids, mask = np.asarray(prompts.ids), np.asarray(prompts.mask)
    tokens, completion_mask = np.asarray(out.tokens), np.asarray(out.mask)
    rows = [np.concatenate([ids[b][mask[b].astype(bool)], tokens[b][completion_mask[b].astype(bool)]])
            for b in range(2)]
    width = max(len(r) for r in rows)
    packed = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int64)
    packed_mask = np.stack([np.pad(np.ones(len(r), np.int64), (0, width - len(r))) for r in rows])
    logits = qf.torch_forward(converted.torch, packed, packed_mask, patches, grids)[1].astype(np.float64)
    logits[..., list(sampling.banned_ids(converted.vlm))] = -np.inf
    scaled = logits / TEMPERATURE
    log_softmax = scaled - np.log(np.sum(np.exp(scaled - scaled.max(-1, keepdims=True)), -1, keepdims=True)) \
        - scaled.max(-1, keepdims=True)
    expected = np.zeros(tokens.shape)
    for b in range(2):
        start, count = mask[b].sum(), completion_mask[b].sum()
        expected[b, :count] = log_softmax[b, start - 1 + np.arange(count), tokens[b, :count]]
    error = relative_error(np.asarray(out.log_probs)[completion_mask.astype(bool)],
                           expected[completion_mask.astype(bool)])
    print(f"{converted.name}: completion log-probs vs transformers {error:.2e}")
    assert error <= TOLERANCE, error


def test_first_ratio_is_exactly_one_per_token(converted):
    """The update program (LoRA merged, under jax.grad): on-policy ratio exactly 1 per token, a nonzero gradient,
    and its log-probs equal the sampler's to float rounding (two compiled programs: <= 1 ulp measured)."""
    spec = trainable_lib.Trainable("lora", rank=4, alpha=8.0, lora_pattern=r"layers/.*_proj/kernel$")
    lora = trainable_lib.init(spec, converted.params, jax.random.key(1))
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # a trained adapter (B != 0)
    merge = lambda base, trainable: trainable_lib.merge(spec, base, trainable)  # noqa: E731
    prompts, _, _ = prompts_for(converted)
    sampler = sampling.make_sampler(converted.vlm, merge, max_new_tokens=STEPS, temperature=TEMPERATURE,
                                    end_id=converted.end_id)
    out = sampler(converted.params, lora, prompts, jax.random.key(3))
    objective = update.make_objective(converted.vlm, merge, temperature=TEMPERATURE, end_id=converted.end_id,
                                      eps_low=0.2, eps_high=0.28, beta=0.04, aggregation="dapo",
                                      max_new_tokens=STEPS)
    batch = update.UpdateBatch(prompts, out.tokens, out.mask, out.log_probs, jnp.array([1.0, -1.0]),
                               jnp.array([True, True]))
    (_, (metrics, ratio)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(lora, converted.params,
                                                                                        batch)
    ratio = np.asarray(ratio)[np.asarray(out.mask).astype(bool)]
    gap = float(metrics["sampler_logp_gap"])
    print(f"{converted.name}: first ratios {np.unique(ratio)}, sampler vs update log-probs {gap:.2e}, "
          f"k3 KL to the base {float(metrics['kl']):.2e}")
    assert np.all(ratio == 1.0), np.abs(ratio - 1).max()
    assert gap <= 1e-6, gap
    assert float(metrics["kl"]) > 0  # the adapter moved the policy off the base
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_end_token_stops_a_row_and_the_loop_compiles_once(converted):
    prompts, _, _ = prompts_for(converted)
    free = sample(converted, prompts, converted.end_id, key=7)
    assert np.asarray(free.mask).all()  # a random model rarely says <|im_end|> in STEPS tokens
    stop = int(np.asarray(free.tokens)[0, 2])  # pretend the third token of row 0 is the end token
    stopped = sample(converted, prompts, stop, key=7)
    tokens, mask = np.asarray(stopped.tokens), np.asarray(stopped.mask)
    first = np.argmax(np.asarray(free.tokens) == stop, axis=1)
    for b in range(2):
        end = first[b] if (np.asarray(free.tokens)[b] == stop).any() else STEPS - 1
        assert mask[b].sum() == end + 1, (b, mask[b])
        assert np.array_equal(tokens[b, :end + 1], np.asarray(free.tokens)[b, :end + 1])
        assert not tokens[b, end + 1:].any()
        assert not np.asarray(stopped.log_probs)[b, end + 1:].any()
    again = sample(converted, prompts, stop, key=8)
    assert not np.array_equal(np.asarray(again.tokens), tokens)  # another key, other tokens
    assert make(converted, stop)._cache_size() == 1


def test_greedy_takes_the_most_likely_token(converted):
    """Evaluation's deterministic completions: each token is the argmax of the decode's logits, whatever the key."""
    prompts, _, _ = prompts_for(converted)
    greedy = sampling.make_sampler(converted.vlm, lambda base, trainable: base, max_new_tokens=STEPS,
                                   temperature=TEMPERATURE, end_id=converted.end_id, return_logits=True, greedy=True)
    out = greedy(converted.params, {}, prompts, jax.random.key(0))
    valid = np.asarray(out.mask).astype(bool)
    assert np.array_equal(np.asarray(out.tokens)[valid], np.argmax(np.asarray(out.logits), -1)[valid])
    assert np.array_equal(np.asarray(greedy(converted.params, {}, prompts, jax.random.key(1)).tokens),
                          np.asarray(out.tokens))
    drawn = sample(converted, prompts, converted.end_id, key=0)
    assert not np.array_equal(np.asarray(drawn.tokens), np.asarray(out.tokens))  # sampling draws other tokens


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.1))).tolist() == [[True, False, False, False]]
    assert np.isfinite(np.asarray(sampling.top_p_filter(logits, 1.0))).all()


def test_bad_sampling_settings_are_named(converted):
    with pytest.raises(ValueError, match="temperature"):
        sampling.make_sampler(converted.vlm, None, temperature=0.0, end_id=1)
    with pytest.raises(ValueError, match="top_p"):
        sampling.make_sampler(converted.vlm, None, top_p=1.5, end_id=1)
