"""Find every problem in a source at once; the check CLI and the loader's start-up both use this."""
from typing import Mapping

import numpy as np
from tqdm import tqdm

from jax_inpaint_rl.data import masks
from jax_inpaint_rl.data.formats import DataError


def find_problems(source, expected_embedding_shapes: Mapping[str, tuple[int, ...]] | None = None,
                  progress: bool = True) -> list[str]:
    """Every problem in the source: its listing, each example's files and contents, duplicate ids,
    and embeddings whose shape differs from `expected_embedding_shapes` (else from the first example's)."""
    problems = list(source.listing_problems)
    first_seen_id: dict[str, str] = {}
    embedding_shapes = {name: (tuple(shape), "as expected") for name, shape in
                        (expected_embedding_shapes or {}).items()}
    for index in tqdm(range(len(source)), desc=f"checking {source.name}", disable=not progress, unit="ex"):
        try:
            example = source[index]
        except DataError as error:
            problems += error.problems
            example = {"id": error.example_id}
        if example["id"] is not None:
            where = source.locate(index, "id")
            if example["id"] in first_seen_id:
                problems.append(f"{where}: duplicate id {example['id']!r} (first at {first_seen_id[example['id']]})")
            first_seen_id.setdefault(example["id"], where)
        if "prompt" in example:
            problems += example_problems(example, source, index)
            problems += embedding_problems(example.get("embeddings", {}), embedding_shapes, source, index)
    return problems


def example_problems(example: dict, source, index: int) -> list[str]:
    """Problems inside one loaded example (prompt, sizes, mask coverage)."""
    def where(field):
        return source.locate(index, field)

    problems = []
    if not isinstance(example["prompt"], str) or not example["prompt"].strip():
        problems.append(f"{where('prompt')}: missing or empty prompt (expected a non-empty string)")
    if source.kind == "prompts":
        return problems
    image = example.get("image")
    if image is None:
        return problems + [f"{where('image')}: no image (expected one in a {source.kind} set)"]
    height, width = image.shape[:2]
    for field in ("mask", "target"):
        other = example.get(field)
        if other is not None and other.shape[:2] != (height, width):
            problems.append(f"{where(field)}: {field} is {other.shape[1]}x{other.shape[0]} but the image "
                            f"{where('image')} is {width}x{height}; expected the same size")
    mask = example.get("mask")
    if source.kind == "inpaint" and mask is None:
        problems.append(f"{where('mask')}: no mask (expected one in an inpaint set)")
    elif mask is not None and not mask.any():
        problems.append(f"{where('mask')}: mask is empty (no pixel > {masks.MASK_THRESHOLD}/255): nothing to fill")
    elif mask is not None and mask.all():
        problems.append(f"{where('mask')}: mask covers the whole image: no context left to inpaint from")
    return problems


def embedding_problems(embeddings: Mapping[str, np.ndarray], shapes: dict, source, index: int) -> list[str]:
    """Embeddings must be floating arrays whose shape matches the expected (or first seen) one per name.

    `shapes` maps name -> (shape, where it came from) and is filled with first-seen shapes."""
    problems = []
    for name, value in embeddings.items():
        where = source.locate(index, name)
        if not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
            problems.append(f"{where}: embedding {name!r} is {value.dtype} with shape {value.shape}; "
                            f"expected a floating array with at least one axis")
            continue
        expected, origin = shapes.setdefault(name, (value.shape, f"as in {where}"))
        if value.shape != expected:
            problems.append(f"{where}: embedding {name!r} has shape {value.shape}, expected {expected} ({origin})")
    missing = sorted(set(shapes) - set(embeddings))
    if missing:
        problems.append(f"{source.locate(index, 'id')}: no embedding {missing} although other examples have one")
    return problems
