"""GenEval (object detection plus CLIP colour checks against each prompt's clauses) as a remote reward.

The detector (Mask2Former through mmdet, CLIP ViT-L/14) lives in its own environment
behind our reward server (serve.py); the trainer holds only the client. Both ends of
the contract live here, so they cannot drift.

Request, on remote.py's wire: `images` (B, H, W, 3) uint8 (sent losslessly; Flow-GRPO
sends JPEGs), `prompts` (B str) and `meta/metadata` (B str): each image's GenEval
record as a JSON object (`prompt`, `tag`, `include` [{class, count[, color][,
position]}], optional `exclude`), which the loader carries from Flow-GRPO's
`{split}_metadata.jsonl`. Nothing else is sent (meta['group'] only splits requests).

Reply: {"scores": {"score": [B in [0, 1]], optional "strict_accuracy" and
"accuracy": [B of 0 or 1], optional "valid"}}. `score` is Flow-GRPO's GenEval
reward (the mean over clauses of how far the detected counts, colours and
positions agree), `strict_accuracy` is 1 when every clause holds with exact
counts, `accuracy` is GenEval's benchmark correctness (counts as lower bounds).
Any other entry, a score outside [0, 1] or an accuracy other than 0 / 1 is a
`BadReply` naming the server, the rows and the values.

Per-tag accuracy (Flow-GRPO's `group_rewards` / `group_strict_rewards`, with -10 on
rows of other tags) is the per-image accuracy grouped by the `tag` in each row's
meta['metadata'], so it is not sent; the adapter checks that the evaluator's per-tag
lists say exactly that, so leaving them out loses nothing.

Server side, `geneval_evaluator` turns an evaluator

    evaluate(images: list[PIL.Image], metadatas: list[dict], only_strict: bool)
        -> (scores, accuracy, strict_accuracy, accuracy by tag, strict accuracy by tag)

(what `load_geneval()` of Flow-GRPO's reward server returns) into a reward to serve:

    python -m jax_inpaint_rl.rewards.serve --reward geneval_evaluator --port 18085 \\
        --config '{"evaluator": "reward_server.gen_eval:load_geneval", "only_strict": false}'

Trainer side: {"geneval": {"weight": 1.0, "config": {"url": "http://HOST:18085", "group_size": 16}}},
with any `remote` option (timeout_s, max_retries, groups_per_request, on_failure, token).
"""
import importlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from jax_inpaint_rl.rewards.base import (Meta, Reward, RewardError, Scores, check_images, check_prompts,
                                         meta_records)
from jax_inpaint_rl.rewards.remote import BadReply, make_remote_reward

REPLY = {"score": "in [0, 1]", "strict_accuracy": "0 or 1", "accuracy": "0 or 1"}  # and 'valid', as remote.py
NOT_THIS_TAG = -10.0  # what Flow-GRPO's per-tag lists hold on rows of other tags


def geneval_records(meta: Meta, prompts: Sequence[str], reward: str) -> list[dict]:
    """meta['metadata'] as one GenEval record per image, each for that image's prompt."""
    if "metadata" not in meta:
        raise KeyError(f"{reward}: meta['metadata'] is required (a GenEval record per image) but meta has "
                       f"{sorted(meta)}; train on a Flow-GRPO GenEval folder (data.format='flow_grpo' with "
                       "{split}_metadata.jsonl)")
    records = meta_records(meta, "metadata", len(prompts), reward)
    for row, (record, prompt) in enumerate(zip(records, prompts)):
        if not isinstance(record.get("tag"), str) or not isinstance(record.get("include"), list):
            raise ValueError(f"{reward}: meta['metadata'] row {row} has tag {record.get('tag')!r} and include "
                             f"{record.get('include')!r}; expected a GenEval record (a tag and a list of clauses)")
        if record.get("prompt") != prompt:
            raise ValueError(f"{reward}: meta['metadata'] row {row} is for prompt {record.get('prompt')!r} but the "
                             f"image's prompt is {prompt!r}; expected each row's record for its own prompt")
    return records


def check_geneval_reply(scores: Scores, start: int, stop: int, url: str) -> None:
    """The reply's entries are REPLY's (and 'valid') with their ranges on every valid row; else `BadReply`."""
    where = f"{url}: bad GenEval reply for rows {start}:{stop}"
    unknown = sorted(set(scores) - set(REPLY) - {"valid"})
    if unknown:
        raise BadReply(f"{where}: unknown entries {unknown}; expected 'score' and optionally 'strict_accuracy', "
                       "'accuracy', 'valid'")
    valid = scores["valid"] > 0
    for name, expected in REPLY.items():
        if name in scores:
            value = scores[name]
            inside = (value >= 0) & (value <= 1) if name == "score" else np.isin(value, (0, 1))
            bad = valid & ~inside
            if bad.any():
                raise BadReply(f"{where}: {name!r} is {value[bad][:3].tolist()} at rows "
                               f"{(start + np.flatnonzero(bad)).tolist()}, expected {expected}")


def make_geneval_reward(url: str, **remote_options) -> Reward:
    """Trainer side: the GenEval server at `url` (remote.py's options apply); the records are checked before
    anything is sent, the replies against REPLY."""
    remote = make_remote_reward(url, reply_check=check_geneval_reply, **remote_options)

    def geneval(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        prompts = check_prompts(prompts, len(images))
        geneval_records(meta, prompts, "geneval")
        return remote(images, prompts, {field: meta[field] for field in ("metadata", "group") if field in meta})

    return geneval


def make_geneval_evaluator(evaluator: str, only_strict: bool = True, **evaluator_config) -> Reward:
    """Server side: `evaluator` is 'module:factory'; factory(**evaluator_config) returns the evaluate callable of
    the module docstring, which the returned reward wraps (see `evaluator_reward`)."""
    module, _, name = evaluator.partition(":")
    if not module or not name:
        raise ValueError(f"geneval_evaluator: evaluator={evaluator!r}; expected 'module:factory', e.g. "
                         "'reward_server.gen_eval:load_geneval'")
    return evaluator_reward(getattr(importlib.import_module(module), name)(**evaluator_config), only_strict)


def evaluator_reward(evaluate: Callable, only_strict: bool = True) -> Reward:
    """A reward over a GenEval evaluate callable. `only_strict` (Flow-GRPO's setting while training) skips
    GenEval's benchmark correctness, whose values are then not computed, so no 'accuracy' is returned."""

    def geneval_evaluator(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        records = geneval_records(meta, check_prompts(prompts, len(images)), "geneval_evaluator")
        scores, accuracy, strict, accuracy_by_tag, strict_by_tag = evaluate(
            [Image.fromarray(image) for image in images], records, only_strict)
        if any(len(values) != len(images) for values in (scores, accuracy, strict)):
            raise RewardError(f"geneval_evaluator: the evaluator returned {len(scores)} scores, {len(accuracy)} "
                              f"accuracies and {len(strict)} strict accuracies for {len(images)} images")
        tags = [record["tag"] for record in records]
        check_by_tag(accuracy_by_tag, accuracy, tags, "accuracy")
        check_by_tag(strict_by_tag, strict, tags, "strict accuracy")
        out = {"score": scores, "strict_accuracy": strict, **({} if only_strict else {"accuracy": accuracy})}
        return {name: np.asarray(value, np.float32) for name, value in out.items()}

    return geneval_evaluator


def check_by_tag(by_tag: dict, per_image: Sequence[float], tags: Sequence[str], what: str) -> None:
    """Each tag's list must be the per-image values on rows with that tag and NOT_THIS_TAG elsewhere."""
    for tag, values in by_tag.items():
        expected = [float(value) if row_tag == tag else NOT_THIS_TAG for value, row_tag in zip(per_image, tags)]
        if [float(value) for value in values] != expected:
            raise RewardError(f"geneval_evaluator: the evaluator's {what} for tag {tag!r} is {list(values)[:8]}; "
                              f"expected the per-image {what} on rows tagged {tag!r} and {NOT_THIS_TAG} elsewhere: "
                              f"{expected[:8]}")
