"""Convert torch `.pt` text embeddings to `.npy` or `.safetensors`, which the library reads without torch.

    python tools/convert_embeddings.py a.pt b.pt [--format npy|safetensors] [--key NAME] [--squeeze]
    python tools/convert_embeddings.py train.jsonl --out train_converted.jsonl [--format npy] [--key NAME]

With .pt files, each is written next to itself with the new suffix. With a JSON /
JSONL listing (seeds 001 / 004), every `<name>_embedding_path` ending in .pt is
converted and the listing is written to --out with the new paths (all
`*_path` fields rewritten relative to --out's folder). A .pt file
must hold one tensor, or a dict of tensors from which --key picks one. bfloat16
and float16 become float32 (numpy has no bfloat16); --squeeze drops a leading
batch axis of size 1 ((1, L, D) -> (L, D)).
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

EMBEDDING_FIELD = re.compile(r"^\w+_embedding_path$")


def load_pt_tensor(path: Path, key: str | None) -> np.ndarray:
    """The one tensor in a .pt file (or dict entry `key`) as a float32 / original-dtype numpy array."""
    value = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(value, dict):
        tensors = {name: item for name, item in value.items() if isinstance(item, torch.Tensor)}
        if key is None and len(tensors) == 1:
            key = next(iter(tensors))
        if key not in tensors:
            raise SystemExit(f"{path}: holds tensors {sorted(tensors)}; pass --key to pick one")
        value = tensors[key]
    if not isinstance(value, torch.Tensor):
        raise SystemExit(f"{path}: holds a {type(value).__name__}, expected a tensor or a dict of tensors")
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()
    return value.detach().cpu().numpy()


def convert_file(path: Path, fmt: str, key: str | None, squeeze: bool) -> Path:
    """Write path with suffix .npy / .safetensors (tensor key 'embedding'); returns the new path."""
    array = load_pt_tensor(path, key)
    if squeeze and array.ndim > 1 and array.shape[0] == 1:
        array = array[0]
    out = path.with_suffix(f".{fmt}")
    if fmt == "npy":
        np.save(out, np.ascontiguousarray(array))
    else:
        save_file({"embedding": np.ascontiguousarray(array)}, str(out))
    return out


def convert_listing(listing: Path, out: Path, fmt: str, key: str | None, squeeze: bool) -> int:
    """Convert every .pt embedding a JSON / JSONL listing names; write the listing with new paths."""
    text = listing.read_text(encoding="utf-8")
    jsonl = listing.suffix == ".jsonl"
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if jsonl else json.loads(text)
    converted = 0
    for record in records if isinstance(records, list) else [records]:
        for field, value in record.items():
            if not (field.endswith("_path") and isinstance(value, str)):
                continue
            path = listing.parent / value
            if EMBEDDING_FIELD.match(field) and path.suffix == ".pt":
                path = convert_file(path, fmt, key, squeeze)
                converted += 1
            record[field] = os.path.relpath(path, out.parent)  # paths stay valid wherever --out is
    out.write_text("\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=1),
                   encoding="utf-8")
    return converted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help=".pt files, or one .json / .jsonl listing")
    parser.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    parser.add_argument("--key", default=None, help="tensor to take from a .pt dict")
    parser.add_argument("--squeeze", action="store_true", help="drop a leading axis of size 1")
    parser.add_argument("--out", type=Path, default=None, help="output listing (listing mode)")
    args = parser.parse_args(argv)
    if args.inputs[0].suffix in (".json", ".jsonl"):
        if len(args.inputs) != 1 or args.out is None:
            parser.error("listing mode takes exactly one .json / .jsonl input and --out")
        count = convert_listing(args.inputs[0], args.out, args.format, args.key, args.squeeze)
        print(f"converted {count} embeddings; wrote {args.out}")
        return 0
    for path in args.inputs:
        print(f"{path} -> {convert_file(path, args.format, args.key, args.squeeze)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
