"""The DiT's conditioning from a completion (vlm_policy/condition.py), tiny Qwen-Image-Edit Plus: with prompts of
uneven lengths (right-padded) and completions of uneven lengths (one ended, one out of tokens), the kept tokens are
exactly the user turn's content onward + the completion + <|im_end|>, and the hidden states equal a forward over each row
alone (no padding), minus the system prefix: what the pipeline's encode would give for that text."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl.models.qwen_image import family as qwen
from jax_inpaint_rl.vlm_policy import condition, sampling
from tests.sd15_fixtures import relative_error

pytestmark = pytest.mark.slow  # compile-bound (sampling / update programs): CI's second stage

VARIANT = "qwen_image_edit_plus"
INSTRUCTIONS = ("make the sky a deep orange sunset", "add a hat")
END = qwen.TINY_IDS["<|im_end|>"]


def tiny_vlm_prompts(instructions):
    """(modules, the tiny Edit Plus VLM with its lm_head, its random params, the instructions' Prompts with random
    32 px images)."""
    modules = qwen.tiny_modules(VARIANT)
    family = qwen.make_family(modules, qwen.make_tokenize(modules, qwen.tiny_encode_texts))
    vlm = modules.vlm.clone(with_lm_head=True)
    params = qwen.vl_lib.init_params(vlm.config, jax.random.key(0), lm_head=True)
    images = np.random.default_rng(0).uniform(-1, 1, (len(instructions), 32, 32, 3)).astype(np.float32)
    tokens = family.tokenize(list(instructions), {"image": images})
    grids = (qwen.vision_grid(modules, 32, 32),) * len(instructions)
    return modules, vlm, params, sampling.prompts_from_tokens(vlm, params, tokens, grids)


def test_kept_tokens_are_the_user_turn_onward_and_hidden_states_match_unpadded_rows():
    modules, vlm, params, prompts = tiny_vlm_prompts(INSTRUCTIONS)
    grid = (qwen.vision_grid(modules, 32, 32),)
    lengths = np.asarray(prompts.mask).sum(1)
    assert lengths[0] != lengths[1]
    completion = np.array([[5, 9, END, 0], [11, 12, 13, 14]], np.int32)  # row 0 ended, row 1 ran out
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    drop = modules.dropped
    ids, kept = condition.kept_ids(prompts, completion, mask, end_id=END, drop=drop)
    cond = condition.condition(vlm, params, prompts, completion, mask, end_id=END, drop=drop)
    assert cond["text"].shape[:2] == ids.shape and np.array_equal(np.asarray(cond["text_mask"]), np.asarray(kept))

    count = qwen.image_token_count(modules, 32, 32)
    for b, instruction in enumerate(INSTRUCTIONS):
        full_text = qwen.prompt_texts(modules, [instruction], count)[0]
        row = qwen.tiny_encode_texts([full_text])[0] + list(completion[b][mask[b].astype(bool)])
        row += [] if row[-1] == END else [END]
        user_onward = full_text[full_text.index("<|im_start|>user\n") + len("<|im_start|>user\n"):]
        expected = qwen.tiny_encode_texts([user_onward])[0] + row[len(qwen.tiny_encode_texts([full_text])[0]):]
        got = np.asarray(ids[b])[np.asarray(kept[b]).astype(bool)]
        assert got.tolist() == row[drop:] == expected, (b, got, expected)
        assert got[2] == qwen.TINY_IDS["<|vision_start|>"]  # "Picture 1: <|vision_start|>...": the user turn

        alone = np.asarray(row, np.int32)[None]
        positions, _ = qwen.vl_lib.rope_index(vlm.config, alone, None, np.array(grid))
        features = prompts.image_features[b * count:(b + 1) * count]
        hidden, _ = vlm.apply({"params": params}, jnp.asarray(alone), jnp.asarray(positions),
                              jnp.ones_like(alone), image_features=features)
        error = relative_error(np.asarray(cond["text"][b])[:len(row) - drop], np.asarray(hidden[0, drop:]))
        print(f"row {b}: {len(row) - drop} kept tokens, hidden states vs the unpadded row {error:.2e}")
        assert error <= 1e-5, error
        assert not np.asarray(cond["text"][b])[len(row) - drop:].any()
