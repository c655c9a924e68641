"""A stand-in for GenEval's detector with its evaluator's signature, for the geneval reward tests.

It "detects" value // 50 objects of the first include clause's class in an image filled with `value`,
and scores the way GenEval's reward does for one clause: 1 - |count - found| / count, floored at 0.
"""
import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def found_objects(image) -> int:
    return int(np.asarray(image)[0, 0, 0]) // 50


def make_stub_evaluator(seen: list | None = None, by_tag_offset: float = 0.0):
    """evaluate(images, metadatas, only_strict) as Flow-GRPO's `load_geneval()` returns it; `seen` collects the
    metadata it was given, `by_tag_offset` corrupts its per-tag lists (an evaluator with another contract)."""

    def evaluate(images, metadatas, only_strict):
        if seen is not None:
            seen.extend(metadatas)
        scores, accuracy, strict = [], [], []
        for image, metadata in zip(images, metadatas):
            count, found = metadata["include"][0]["count"], found_objects(image)
            scores.append(max(0.0, 1 - abs(count - found) / count))
            strict.append(1.0 if found == count else 0.0)
            accuracy.append(0.0 if only_strict else 1.0 if found >= count else 0.0)
        tags = [metadata["tag"] for metadata in metadatas]
        return scores, accuracy, strict, per_tag(accuracy, tags, by_tag_offset), per_tag(strict, tags, by_tag_offset)

    return evaluate


def per_tag(values, tags, offset: float = 0.0) -> dict:
    """Flow-GRPO's per-tag lists: each row's value under its own tag (+ offset), -10 under every other tag."""
    return {tag: [value + offset if row_tag == tag else -10.0 for value, row_tag in zip(values, tags)] for tag in TAGS}
