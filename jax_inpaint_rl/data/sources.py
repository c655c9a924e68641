"""Open any dataset path as a source: the one place that knows every format.

It lives apart from formats.py so that formats.py (which tfds_builder.py and
validate.py import) never imports them back. tfds_builder is imported lazily:
importing tensorflow_datasets takes seconds that local formats should not pay.
"""
from pathlib import Path

from jax_inpaint_rl.data.formats import (DataError, SELF_BENCH_LISTING, flow_grpo_splits, read_flow_grpo, read_json,
                                         read_prompt_list, read_self_bench)


def open_source(path: str | Path, kind: str = "auto", split: str = "train", **tfds_options):
    """A source for a self_bench folder, a Flow-GRPO dataset folder (its `split`), a .json/.jsonl listing,
    a .txt prompt list, a prepared TFDS folder or 'tfds:NAME' (its `split`; tfds_options go to
    tfds_builder.open_tfds). A folder is Flow-GRPO's when it has no self_bench.txt but a split file."""
    if str(path).startswith("tfds:") or (Path(path) / "dataset_info.json").is_file():
        from jax_inpaint_rl.data import tfds_builder  # imports tensorflow_datasets only when needed
        return tfds_builder.open_tfds(str(path), split=split, **tfds_options)
    path = Path(path)
    if path.is_dir():
        if not (path / SELF_BENCH_LISTING).is_file() and flow_grpo_splits(path):
            return read_flow_grpo(path, split)
        return read_self_bench(path)
    if not path.is_file():
        raise DataError([f"{path}: dataset path does not exist (expected a self_bench or Flow-GRPO folder, "
                         f".json, .jsonl or .txt file, a TFDS folder or tfds:NAME)"])
    if path.suffix in (".json", ".jsonl"):
        return read_json(path, kind)
    if path.suffix == ".txt":
        return read_prompt_list(path)
    raise DataError([f"{path}: unknown dataset suffix {path.suffix!r}, expected .json, .jsonl or .txt "
                     f"(or a folder with {SELF_BENCH_LISTING})"])
