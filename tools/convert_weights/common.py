"""Key tables that map torch state-dict names to Flax parameter paths, and back.

A converter is a list of `Rule`s: a regex over the torch key, the Flax path it
becomes (regex replacement syntax, '/'-separated), and a layout transform. Every
torch key must match exactly one rule, every expected Flax path must be produced,
and every produced shape must equal the expected one; otherwise `ConversionError`
lists all offending keys at once.
"""
import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np


class ConversionError(ValueError):
    """A checkpoint does not fit the model: lists every unknown, missing or mis-shaped key."""


# Layout transforms: torch -> Flax, and their inverses (Flax -> torch).
def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_to_flax(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(x.T)


def conv_to_flax(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_from_flax(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def conv1x1_to_linear_flax(x: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d weight (out, in, 1, 1) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(x[:, :, 0, 0].T)


def linear_flax_to_conv1x1(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T[:, :, None, None])


INVERSE: dict[Callable, Callable] = {
    identity: identity,
    linear_to_flax: linear_to_flax,
    conv_to_flax: conv_from_flax,
    conv1x1_to_linear_flax: linear_flax_to_conv1x1,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_pattern: str  # full-match regex over the torch key
    flax_template: str  # replacement, e.g. r"down_blocks_\1/resnets_\2/conv1/kernel"
    transform: Callable[[np.ndarray], np.ndarray] = identity


def _match(rules: Iterable[Rule], torch_key: str) -> tuple[str, Rule] | None:
    for rule in rules:
        m = re.fullmatch(rule.torch_pattern, torch_key)
        if m:
            return m.expand(rule.flax_template), rule
    return None


def map_keys(rules: list[Rule], torch_keys: Iterable[str]) -> tuple[dict[str, tuple[str, Rule]], list[str]]:
    """torch key -> (flax path, rule), plus the torch keys no rule matches."""
    mapping, unknown = {}, []
    for key in torch_keys:
        hit = _match(rules, key)
        if hit is None:
            unknown.append(key)
        else:
            mapping[key] = hit
    return mapping, unknown


def _format_problems(source: str, unknown, missing, misshaped, duplicated) -> str:
    lines = [f"{source}: checkpoint does not match the model"]
    for title, items in (
        ("unknown keys (no rule maps them)", unknown),
        ("missing keys (the model needs them)", missing),
        ("wrong shapes", misshaped),
        ("keys mapped twice", duplicated),
    ):
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def convert(
    source: str,
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    rules: list[Rule],
    expected_shapes: Mapping[str, tuple[int, ...]],
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (flax path, array) pairs from (torch key, array) pairs.

    Validation of names happens before any tensor is transformed when `tensors` is a
    mapping; with an iterator, problems are collected and raised at the end. Either
    way the error names every problem, with `source` (the file) in front.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    unknown, misshaped, duplicated, produced = [], [], [], set()
    for torch_key, value in items:
        hit = _match(rules, torch_key)
        if hit is None:
            unknown.append(torch_key)
            continue
        flax_path, rule = hit
        if flax_path in produced:
            duplicated.append(f"{torch_key} -> {flax_path}")
            continue
        produced.add(flax_path)
        array = rule.transform(np.asarray(value))
        expected = expected_shapes.get(flax_path)
        if expected is None:
            unknown.append(f"{torch_key} -> {flax_path} (not a parameter of the model)")
        elif tuple(array.shape) != tuple(expected):
            misshaped.append(f"{torch_key} -> {flax_path}: got {tuple(array.shape)}, expected {tuple(expected)}")
        elif not (unknown or misshaped or duplicated):
            yield flax_path, array
    missing = sorted(set(expected_shapes) - produced)
    if unknown or missing or misshaped or duplicated:
        raise ConversionError(_format_problems(source, unknown, missing, misshaped, duplicated))


def export(
    flat_params: Mapping[str, np.ndarray],
    rules: list[Rule],
    torch_keys: Iterable[str],
) -> dict[str, np.ndarray]:
    """Flax flat params -> torch state dict, for the given torch key set (round trip of `convert`)."""
    mapping, unknown = map_keys(rules, torch_keys)
    missing = [f"{k} <- {p}" for k, (p, _) in mapping.items() if p not in flat_params]
    if unknown or missing:
        raise ConversionError(_format_problems("export", unknown, missing, [], []))
    return {k: INVERSE[rule.transform](np.asarray(flat_params[p])) for k, (p, rule) in mapping.items()}
