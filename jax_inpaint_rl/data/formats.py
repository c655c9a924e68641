"""Local dataset formats -> sources of examples.

An *example* is a host-side dict of numpy values:

    id           str, unique in the dataset
    prompt       str (the instruction, for edit sets)
    image        uint8 (H, W, 3): the model input (self_bench 'source')      [inpaint, edit]
    mask         float32 (H, W, 1) in {0, 1}, 1 = fill; binarised > 127/255  [inpaint]
    target       uint8 (H, W, 3): what SFT / DPO learn toward (self_bench 'ref'), optional
    target_text  str or None: the text that should appear in the mask (OCR rewards)
    embeddings   {name: float32 array}: precomputed text embeddings, maybe empty
    metadata     str, only where the listing has one: the example's record as a JSON
                 object (Flow-GRPO GenEval sets), for rewards that read it (meta['metadata'])

A *source* is a random-access sequence of examples (`len`, `source[i]`) that also
says where each field comes from (`locate(i, field)`, for error messages), its
`kind` ('inpaint', 'edit' or 'prompts'), the problems found while listing it, and
its `fields`: the frozenset of example fields that every example has (not None),
so that a family or an algorithm can say up front what it lacks. Always 'prompt';
'image', 'mask', 'target', 'target_text' (non-empty), 'metadata' when every
example has one; `embedding_field(name)` ('embedding:NAME') for every embedding
every example has. The loader, the checker and the TFDS builder work on any
source; sources.py opens a path as one.

Formats read here (paths inside a listing are relative to the listing's folder):

- self_bench folder: `self_bench.txt` with one sample per line, either
  `NUMBER<TAB>PROMPT[<TAB>TARGET_TEXT]` or `NUMBER PROMPT` (the number may be
  followed by ':', ',' or '.'); blank lines and lines starting with '#' are skipped.
  Sample N uses `testN_source.png`, `testN_mask.png`, `testN_ref.png` with N as
  written, else N zero-padded to two digits (line `1 ...` finds `test01_*.png`);
  its id is N without leading zeros (so `2` and `02` are duplicates).
- JSON (a list of objects) or JSONL (one object per line): `image_path`,
  `mask_path`, `prompt`, optional `id` (default: the record's 0-based position),
  `target_path`, `target_text`, and
  `<name>_embedding_path` (`.npy` or `.safetensors`; convert `.pt` files with
  tools/convert_embeddings.py). Without any `mask_path` the file is an edit set
  (`image_path` + `prompt` or `instruction`); without any `image_path` it is a
  prompt list.
- Prompt list `.txt`: one prompt per non-blank line.
- Flow-GRPO dataset folder (its `TextPromptDataset` / `GenevalPromptDataset`), one
  file per split: `{split}.txt`, one prompt per line, or `{split}_metadata.jsonl`,
  one JSON object per line with a `prompt`; the whole object is the example's
  `metadata`. Objects with GenEval's keys (`tag`, `include`, `exclude`) are checked
  as GenEval's detector reads them. Every line is an example, as in Flow-GRPO, so a
  blank line is a problem; an example's id is its 0-based line (Flow-GRPO's index).

Listings are UTF-8 text; one that lists no sample is a listing problem.
"""
import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from jax_inpaint_rl.data import masks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SELF_BENCH_LISTING = "self_bench.txt"
SELF_BENCH_ROLES = {"image": "source", "mask": "mask", "target": "ref"}
FLOW_GRPO_SUFFIXES = (".txt", "_metadata.jsonl")  # {split}.txt: TextPromptDataset; GenevalPromptDataset
GENEVAL_KEYS = ("tag", "include", "exclude")
_SELF_BENCH_LINE = re.compile(r"^\s*(\d+)\s*[:,.]?\s+(.*\S)\s*$")
_EMBEDDING_FIELD = re.compile(r"^(\w+)_embedding_path$")
REQUIRED_FIELDS = {"inpaint": ("image_path", "mask_path"), "edit": ("image_path",), "prompts": ()}


class DataError(ValueError):
    """One or more problems with a dataset; each message names the file / record and the expectation."""

    def __init__(self, problems: Sequence[str], example_id: str | None = None):
        self.problems = list(problems)
        self.example_id = example_id
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} data problem(s):\n  {shown}{more}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One listed example before its files are read."""

    id: str
    origin: str  # 'data.jsonl line 3': where the listing names it
    prompt: str | None
    image: Path | None = None
    mask: Path | None = None
    target: Path | None = None
    target_text: str | None = None
    embeddings: dict[str, Path] = dataclasses.field(default_factory=dict)
    metadata: str | None = None  # JSON object text


def embedding_field(name: str) -> str:
    """The `fields` entry saying every example has the precomputed embedding `name`."""
    return f"embedding:{name}"


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); raises DataError naming the file when missing or corrupt."""
    return np.asarray(_decode(path, "RGB", "image"))


def read_mask(path: Path) -> np.ndarray:
    """float32 (H, W, 1) in {0, 1}: luminance > MASK_THRESHOLD is the region to fill."""
    return masks.binarize(np.asarray(_decode(path, "L", "mask")))


def read_embedding(path: Path) -> np.ndarray:
    """A precomputed text embedding from .npy or a single-tensor .safetensors file."""
    if not path.is_file():
        raise DataError([f"{path}: embedding file does not exist"])
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError([f"{path}: cannot read .npy embedding ({error})"]) from error
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError
            raise DataError([f"{path}: cannot read .safetensors embedding ({error})"]) from error
        if len(tensors) != 1:
            raise DataError([f"{path}: expected exactly one tensor, found {sorted(tensors)}"])
        return next(iter(tensors.values()))
    if path.suffix in (".pt", ".pth", ".bin"):
        raise DataError([f"{path}: torch files are not read by the library; convert with "
                         f"`python tools/convert_embeddings.py {path}` to .npy or .safetensors"])
    raise DataError([f"{path}: embedding suffix {path.suffix!r}, expected .npy or .safetensors"])


class FileSource:
    """Examples listed by a local file (self_bench, JSON/JSONL, prompt list), read lazily."""

    def __init__(self, entries: Sequence[Entry], kind: str, name: str, listing_problems: Sequence[str] = ()):
        self.entries = list(entries)
        self.kind = kind
        self.name = name
        self.listing_problems = list(listing_problems)
        self.fields = entry_fields(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def locate(self, index: int, field: str) -> str:
        entry = self.entries[index]
        path = entry.embeddings.get(field) if field not in ("image", "mask", "target") else getattr(entry, field)
        return str(path) if path is not None else f"{entry.origin} ({field})"

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        example = {"id": entry.id, "prompt": entry.prompt, "target_text": entry.target_text, "embeddings": {}}
        if entry.metadata is not None:
            example["metadata"] = entry.metadata
        problems = []
        readers = {"image": read_image, "mask": read_mask, "target": read_image}
        for field, reader in readers.items():
            path = getattr(entry, field)
            if path is not None:
                problems += _collect(example, field, reader, path)
        for name, path in entry.embeddings.items():
            problems += _collect(example["embeddings"], name, read_embedding, path)
        if problems:
            raise DataError(problems, example_id=entry.id)
        return example


def entry_fields(entries: Sequence[Entry]) -> frozenset[str]:
    """The fields every entry provides (see the module docstring); only 'prompt' when there are none."""
    if not entries:
        return frozenset({"prompt"})
    fields = {"prompt"}
    fields.update(field for field in ("image", "mask", "target")
                  if all(getattr(entry, field) is not None for entry in entries))
    if all(isinstance(entry.target_text, str) and entry.target_text.strip() for entry in entries):
        fields.add("target_text")
    if all(entry.metadata is not None for entry in entries):
        fields.add("metadata")
    shared = set.intersection(*(set(entry.embeddings) for entry in entries))
    return frozenset(fields | {embedding_field(name) for name in shared})


def read_self_bench(folder: Path) -> FileSource:
    """Seed 000's layout: self_bench.txt + testN_{source,mask,ref}.png per sample."""
    listing = folder / SELF_BENCH_LISTING
    if not listing.is_file():
        raise DataError([f"{folder}: expected {SELF_BENCH_LISTING} in the folder (self_bench format), or "
                         f"{{split}}.txt / {{split}}_metadata.jsonl (a Flow-GRPO dataset folder)"])
    entries, problems = [], []
    for line_number, line in enumerate(read_listing(listing).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        origin = f"{listing} line {line_number}"
        parsed = _parse_self_bench_line(line)
        if parsed is None:
            problems.append(f"{origin}: {line!r} is not 'NUMBER<TAB>PROMPT[<TAB>TARGET_TEXT]' or 'NUMBER PROMPT'")
            continue
        number, prompt, target_text = parsed
        files = {field: _self_bench_file(folder, number, role) for field, role in SELF_BENCH_ROLES.items()}
        entries.append(Entry(id=str(int(number)), origin=origin, prompt=prompt, target_text=target_text, **files))
    if not entries and not problems:
        problems.append(f"{listing}: no samples listed (only blank or '#' lines); expected "
                        f"'NUMBER<TAB>PROMPT[<TAB>TARGET_TEXT]' or 'NUMBER PROMPT' lines")
    return FileSource(entries, "inpaint", str(folder), problems)


def read_json(path: Path, kind: str = "auto") -> FileSource:
    """Seeds 001 / 004: a JSON list or JSONL of records with paths relative to the file."""
    records, problems = _json_records(path)
    if kind == "auto":
        kind = _infer_kind(record for _, record in records)
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"dataset kind {kind!r}: expected 'auto' or one of {sorted(REQUIRED_FIELDS)}")
    entries = []
    for position, (origin, record) in enumerate(records):
        entry, record_problems = _entry_from_record(record, origin, position, path.parent, kind)
        problems += record_problems
        if entry is not None:
            entries.append(entry)
    if not records and not problems:
        problems.append(f"{path}: no samples listed; expected "
                        + ("one JSON object per line" if path.suffix == ".jsonl" else "a list of JSON objects"))
    return FileSource(entries, kind, str(path), problems)


def read_prompt_list(path: Path) -> FileSource:
    """One prompt per non-blank line (text-to-image recipes)."""
    entries = [Entry(id=str(number), origin=f"{path} line {number}", prompt=line.strip())
               for number, line in enumerate(read_listing(path).splitlines(), 1) if line.strip()]
    problems = [] if entries else [f"{path}: no samples listed (only blank lines); expected one prompt per line"]
    return FileSource(entries, "prompts", str(path), problems)


def read_flow_grpo(folder: str | Path, split: str = "train") -> FileSource:
    """One split of a Flow-GRPO dataset folder (dataset/ocr, dataset/geneval, ...) as a prompt set."""
    listing = flow_grpo_listing(Path(folder), split)
    read_line = _geneval_line if listing.name.endswith(FLOW_GRPO_SUFFIXES[1]) else _text_prompt_line
    entries, problems = [], []
    for number, line in enumerate(read_listing(listing).splitlines(), 1):
        entry, line_problems = read_line(line, f"{listing} line {number}", str(number - 1))
        problems += line_problems
        if entry is not None:
            entries.append(entry)
    if not entries and not problems:
        problems.append(f"{listing}: no samples listed (the file is empty); expected one example per line")
    return FileSource(entries, "prompts", str(listing), problems)


def flow_grpo_listing(folder: Path, split: str) -> Path:
    """The split's file in a Flow-GRPO folder; a DataError names what the folder holds instead."""
    if not folder.is_dir():
        raise DataError([f"{folder}: Flow-GRPO dataset folder does not exist (expected a folder with "
                         f"{split}.txt or {split}_metadata.jsonl)"])
    found = [folder / f"{split}{suffix}" for suffix in FLOW_GRPO_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) == 2:
        raise DataError([f"{folder}: both {found[0].name} and {found[1].name} exist for split {split!r}; expected "
                         f"one (Flow-GRPO picks by its prompt_fn): move the other out of the folder"])
    if not found:
        raise DataError([f"{folder}: no {split}.txt or {split}_metadata.jsonl for split {split!r} (Flow-GRPO "
                         f"layout); splits in the folder: {flow_grpo_splits(folder) or 'none'}"])
    return found[0]


def flow_grpo_splits(folder: Path) -> list[str]:
    """The split names a folder holds in Flow-GRPO's layouts (self_bench.txt is not one)."""
    names = {path.name.removesuffix(FLOW_GRPO_SUFFIXES[1]) for path in folder.glob(f"*{FLOW_GRPO_SUFFIXES[1]}")}
    names.update(path.stem for path in folder.glob("*.txt") if path.name != SELF_BENCH_LISTING)
    return sorted(names)


def _text_prompt_line(line: str, origin: str, example_id: str) -> tuple[Entry | None, list[str]]:
    if not line.strip():
        return None, [f"{origin}: empty prompt; expected one prompt per line (Flow-GRPO would train on '')"]
    return Entry(id=example_id, origin=origin, prompt=line.strip()), []


def _geneval_line(line: str, origin: str, example_id: str) -> tuple[Entry | None, list[str]]:
    if not line.strip():
        return None, [f"{origin}: blank line; expected one JSON object per line"]
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, [f"{origin}: invalid JSON ({error.msg}); expected one JSON object per line"]
    if not isinstance(record, dict):
        return None, [f"{origin}: expected a JSON object, got {type(record).__name__}"]
    problems = geneval_problems(record, origin)
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        problems.insert(0, f"{origin}: missing or empty 'prompt' (expected a non-empty string)")
    if problems:
        return None, problems
    return Entry(id=example_id, origin=origin, prompt=record["prompt"], metadata=json.dumps(record)), []


def geneval_problems(record: dict, origin: str) -> list[str]:
    """GenEval's metadata as its detector reads it, for records with any of its keys: a `tag`, `include`
    clauses (all must hold) and optional `exclude` clauses, each {class, count[, color][, position]}."""
    if not any(key in record for key in GENEVAL_KEYS):
        return []
    problems = []
    if not isinstance(record.get("tag"), str) or not record["tag"]:
        problems.append(f"{origin}: 'tag' is {record.get('tag')!r}; expected GenEval's task name (e.g. 'counting')")
    for key, default in (("include", None), ("exclude", [])):
        clauses = record.get(key, default)
        if not isinstance(clauses, list) or (key == "include" and not clauses):
            problems.append(f"{origin}: {key!r} is {clauses!r}; expected a {'non-empty ' if default is None else ''}"
                            f"list of {{'class', 'count', ...}} objects")
            continue
        for index, clause in enumerate(clauses):
            earlier = index if key == "include" else 0  # a position names an earlier include clause
            problems += [f"{origin}: {key}[{index}] {problem}" for problem in _clause_problems(clause, earlier)]
    return problems


def _clause_problems(clause, earlier: int) -> list[str]:
    if not isinstance(clause, dict):
        return [f"is {clause!r}; expected an object with 'class' and 'count'"]
    problems = []
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        problems.append(f"'class' is {clause.get('class')!r}; expected an object class name")
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        problems.append(f"'count' is {count!r}; expected an integer >= 1")
    if "color" in clause and not isinstance(clause["color"], str):
        problems.append(f"'color' is {clause['color']!r}; expected a colour name")
    position = clause.get("position")
    if "position" in clause and not (isinstance(position, list) and len(position) == 2
                                     and isinstance(position[0], str) and type(position[1]) is int
                                     and 0 <= position[1] < earlier):
        problems.append(f"'position' is {position!r}; expected [relation, index of an earlier include clause]")
    return problems


def read_listing(path: Path) -> str:
    """A listing's text; a file that is not UTF-8 raises a DataError naming it and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError([f"{path}: byte offset {error.start} (line {line}, byte 0x{data[error.start]:02x}) is "
                         f"not valid UTF-8 ({error.reason}); expected a UTF-8 text file"]) from None


def _decode(path: Path, mode: str, what: str) -> Image.Image:
    if not path.is_file():
        raise DataError([f"{path}: {what} file does not exist"])
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError([f"{path}: cannot decode {what} ({error}); expected a readable image file"]) from error


def _collect(target: dict, key: str, reader, path: Path) -> list[str]:
    """Read into target[key]; return the problems instead of raising, so all are reported."""
    try:
        target[key] = reader(path)
        return []
    except DataError as error:
        return error.problems


def _parse_self_bench_line(line: str) -> tuple[str, str, str | None] | None:
    if "\t" in line:
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) in (2, 3) and fields[0].isdigit() and fields[1]:
            return fields[0], fields[1], (fields[2] or None) if len(fields) == 3 else None
        return None
    match = _SELF_BENCH_LINE.match(line)
    return (match.group(1), match.group(2), None) if match else None


def _self_bench_file(folder: Path, number: str, role: str) -> Path:
    """testN_role.ext for N as written, else zero-padded to 2; the first existing, else testNN_role.png."""
    padded = f"{int(number):02d}"
    candidates = [folder / f"test{name}_{role}{suffix}"
                  for name in dict.fromkeys((number, padded)) for suffix in IMAGE_SUFFIXES]
    return next((candidate for candidate in candidates if candidate.is_file()), folder / f"test{padded}_{role}.png")


def _json_records(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    """[(origin, record)] in file order, plus the lines / items that are not JSON objects."""
    text = read_listing(path)
    if path.suffix == ".jsonl":
        records, problems = [], []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path} line {line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                problems.append(f"{path} line {line_number}: invalid JSON ({error.msg})")
        return records, problems
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        return [], [f"{path}: invalid JSON at line {error.lineno} ({error.msg}); expected a list of objects"]
    if isinstance(items, dict):  # seed 001 shows a single object
        items = [items]
    if not isinstance(items, list):
        return [], [f"{path}: top level is {type(items).__name__}, expected a list of objects"]
    return [(f"{path} item {index}", item) for index, item in enumerate(items)], []


def _infer_kind(records) -> str:
    keys = set().union(*(record.keys() for record in records if isinstance(record, dict)))
    return "inpaint" if "mask_path" in keys else "edit" if "image_path" in keys else "prompts"


def _entry_from_record(record, origin: str, position: int, root: Path, kind: str):
    if not isinstance(record, dict):
        return None, [f"{origin}: expected a JSON object, got {type(record).__name__}"]
    prompt = record.get("prompt", record.get("instruction"))
    problems = [f"{origin}: missing field {field!r} (required in every record of an {kind} set)"
                for field in REQUIRED_FIELDS[kind] if not isinstance(record.get(field), str)]
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"{origin}: missing or empty 'prompt' (expected a non-empty string)")
    if problems:
        return None, problems
    paths = {field: root / record[f"{field}_path"] for field in ("image", "mask", "target")
             if isinstance(record.get(f"{field}_path"), str)}
    embeddings = {match.group(1): root / value for key, value in record.items()
                  if (match := _EMBEDDING_FIELD.match(key)) and isinstance(value, str)}
    entry = Entry(id=str(record.get("id", position)), origin=origin, prompt=prompt,
                  target_text=record.get("target_text"), embeddings=embeddings, **paths)
    return entry, []

