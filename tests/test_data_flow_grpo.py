"""Flow-GRPO's prompt folders (data.format='flow_grpo'): both layouts, splits, metadata carried into batches
and through TFDS, every bad input named with file and line, and what the check prints."""
import json
import re
import types

import pytest

from jax_inpaint_rl import setup
from jax_inpaint_rl.data import DataError, Loader, check, find_problems, loaders_from_config, open_source
from jax_inpaint_rl.data.formats import read_flow_grpo

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}],
     "prompt": "a photo of three cats"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "car", "count": 1,
                                                                    "position": ["left of", 0]}],
     "prompt": "a photo of a car left of a dog"},
    {"tag": "color_attr", "include": [{"class": "vase", "count": 1, "color": "green"}],
     "prompt": "a photo of a green vase in a caf\u00e9"},
]


def write_geneval(folder, splits=("train", "test")):
    """`{split}_metadata.jsonl` per split; train holds GENEVAL, test its last two records."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        records = GENEVAL if split == "train" else GENEVAL[2:]
        (folder / f"{split}_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                                        encoding="utf-8")
    return folder


TEXT_SPLITS = {"train": ["a cat", '  a sign that says "OPEN" '], "test": ["a dog"]}


def write_text_prompts(folder):
    """`{split}.txt` per split of TEXT_SPLITS."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, prompts in TEXT_SPLITS.items():
        (folder / f"{split}.txt").write_text("\n".join(prompts) + "\n")
    return folder


def flow_grpo_config(path, eval_path=""):
    return types.SimpleNamespace(format="flow_grpo", path=str(path), eval_path=str(eval_path), resolution=16)


def test_text_layout_every_line_a_prompt_with_flow_grpos_index(tmp_path):
    folder = write_text_prompts(tmp_path / "ocr")
    source = read_flow_grpo(folder, "train")
    assert (source.kind, source.name, source.fields) == ("prompts", str(folder / "train.txt"), {"prompt"})
    assert [source[i] for i in range(2)] == [
        {"id": "0", "prompt": "a cat", "target_text": None, "embeddings": {}},
        {"id": "1", "prompt": 'a sign that says "OPEN"', "target_text": None, "embeddings": {}}]
    assert source.locate(1, "prompt") == f"{folder / 'train.txt'} line 2 (prompt)"
    test = open_source(folder, split="test")  # a folder without self_bench.txt but with split files
    assert test.name == str(folder / "test.txt") and test[0]["prompt"] == "a dog"
    assert find_problems(source, progress=False) == []


def test_geneval_layout_carries_each_record_as_metadata(tmp_path):
    folder = write_geneval(tmp_path / "geneval")
    source = open_source(folder)
    assert (source.kind, source.name) == ("prompts", str(folder / "train_metadata.jsonl"))
    assert source.fields == {"prompt", "metadata"}
    for index, record in enumerate(GENEVAL):
        example = source[index]
        assert (example["id"], example["prompt"]) == (str(index), record["prompt"])
        assert json.loads(example["metadata"]) == record
    assert find_problems(source, progress=False) == []


def test_loaders_read_train_and_test_and_batches_carry_metadata_row_by_row(tmp_path):
    folder = write_geneval(tmp_path / "geneval")
    train, held_out, _ = loaders_from_config(flow_grpo_config(folder), prompts_per_batch=2, seed=0)
    assert train.name == str(folder / "train_metadata.jsonl") and len(train.source) == 4
    assert held_out.name == str(folder / "test_metadata.jsonl")
    assert [json.loads(m) for m in held_out.batch_at(0, 0)["metadata"]] == GENEVAL[2:]
    assert "metadata" in train.fields and "metadata" in held_out.fields

    grouped = Loader(train.source, prompts_per_batch=4, group_size=3, seed=1, prefetch=0).batch_at(0, 0)
    records = [json.loads(m) for m in grouped["metadata"]]
    assert len(records) == 12 and [r["prompt"] for r in records] == grouped["prompt"]
    assert all(records[k] == records[k - k % 3] for k in range(12))  # each prompt's group shares its record

    other = write_geneval(tmp_path / "other", splits=("test",))
    _, held_out, _ = loaders_from_config(flow_grpo_config(folder, other), prompts_per_batch=2, seed=0)
    assert held_out.name == str(other / "test_metadata.jsonl")

    text = write_text_prompts(tmp_path / "ocr")
    train, held_out, _ = loaders_from_config(flow_grpo_config(text), prompts_per_batch=2, seed=0)
    assert "metadata" not in train.batch_at(0, 0) and held_out.batch_at(0, 0)["prompt"][0] == "a dog"


def test_setup_accepts_the_format():
    accepts, expected = dict(setup.FIELD_RULES)["data.format"]
    assert accepts("flow_grpo") and "flow_grpo" in expected


def test_a_missing_split_an_ambiguous_split_or_folder_is_named(tmp_path):
    folder = write_geneval(tmp_path / "geneval", splits=("train",))
    with pytest.raises(DataError) as raised:
        loaders_from_config(flow_grpo_config(folder), prompts_per_batch=2, seed=0)
    assert raised.value.problems == [f"{folder}: no test.txt or test_metadata.jsonl for split 'test' (Flow-GRPO "
                                     "layout); splits in the folder: ['train']"]
    (folder / "train.txt").write_text("a cat\n")
    with pytest.raises(DataError, match="both train.txt and train_metadata.jsonl exist for split 'train'"):
        read_flow_grpo(folder, "train")
    with pytest.raises(DataError, match="Flow-GRPO dataset folder does not exist"):
        read_flow_grpo(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()  # neither layout
    with pytest.raises(DataError, match=r"or \{split\}.txt / \{split\}_metadata.jsonl"):
        open_source(tmp_path / "empty")


GOOD = json.dumps(GENEVAL[0])
CLAUSES = "'class', 'count', ..."


@pytest.mark.parametrize("line, problem", [
    ("", "blank line; expected one JSON object per line"),
    ("prompt: a cat", "invalid JSON (Expecting value); expected one JSON object per line"),
    ('["a cat"]', "expected a JSON object, got list"),
    ('{"text": "a cat"}', "missing or empty 'prompt' (expected a non-empty string)"),
    ('{"prompt": "  "}', "missing or empty 'prompt' (expected a non-empty string)"),
    ('{"prompt": 3}', "missing or empty 'prompt' (expected a non-empty string)"),
    ('{"prompt": "p", "include": [{"class": "cat", "count": 1}]}',
     "'tag' is None; expected GenEval's task name (e.g. 'counting')"),
    ('{"prompt": "p", "tag": "counting"}', f"'include' is None; expected a non-empty list of {{{CLAUSES}}} objects"),
    ('{"prompt": "p", "tag": "counting", "include": []}',
     f"'include' is []; expected a non-empty list of {{{CLAUSES}}} objects"),
    ('{"prompt": "p", "tag": "t", "include": ["cat"]}',
     "include[0] is 'cat'; expected an object with 'class' and 'count'"),
    ('{"prompt": "p", "tag": "t", "include": [{"count": 1}]}',
     "include[0] 'class' is None; expected an object class name"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": 0}]}',
     "include[0] 'count' is 0; expected an integer >= 1"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": "2"}]}',
     "include[0] 'count' is '2'; expected an integer >= 1"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": true}]}',
     "include[0] 'count' is True; expected an integer >= 1"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": 1, "color": 3}]}',
     "include[0] 'color' is 3; expected a colour name"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}',
     "include[0] 'position' is ['left of', 0]; expected [relation, index of an earlier include clause]"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": 1}], "exclude": {"class": "cat"}}',
     f"'exclude' is {{'class': 'cat'}}; expected a list of {{{CLAUSES}}} objects"),
    ('{"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": 1}], '
     '"exclude": [{"class": "dog", "count": 1, "position": ["above", 0]}]}',
     "exclude[0] 'position' is ['above', 0]; expected [relation, index of an earlier include clause]"),
])
def test_every_bad_geneval_line_is_named_with_file_and_line(tmp_path, capsys, line, problem):
    folder = tmp_path / "geneval"
    folder.mkdir()
    listing = folder / "train_metadata.jsonl"
    listing.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    source = read_flow_grpo(folder, "train")
    assert find_problems(source, progress=False) == [f"{listing} line 2: {problem}"]
    assert [source[i]["id"] for i in range(len(source))] == ["0", "2"]  # the good lines keep their index
    assert check.main([str(folder)]) == 1
    assert f"{listing} line 2: {problem}" in capsys.readouterr().out
    with pytest.raises(DataError, match="line 2"):
        Loader(source, prompts_per_batch=1)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    folder = tmp_path / "geneval"
    folder.mkdir()
    listing = folder / "train_metadata.jsonl"
    listing.write_text('{"tag": 1, "include": [{"class": "", "count": -1}]}\n')
    assert find_problems(read_flow_grpo(folder), progress=False) == [f"{listing} line 1: {problem}" for problem in (
        "missing or empty 'prompt' (expected a non-empty string)",
        "'tag' is 1; expected GenEval's task name (e.g. 'counting')",
        "include[0] 'class' is ''; expected an object class name",
        "include[0] 'count' is -1; expected an integer >= 1")]


@pytest.mark.parametrize("text, problem", [
    ("a cat\n\na dog\n", " line 2: empty prompt; expected one prompt per line (Flow-GRPO would train on '')"),
    ("a cat\n   \n", " line 2: empty prompt; expected one prompt per line (Flow-GRPO would train on '')"),
    ("", ": no samples listed (the file is empty); expected one example per line"),
])
def test_bad_text_prompt_files_are_named(tmp_path, text, problem):
    folder = tmp_path / "ocr"
    folder.mkdir()
    (folder / "train.txt").write_text(text)
    assert find_problems(read_flow_grpo(folder), progress=False) == [f"{folder / 'train.txt'}{problem}"]


def test_an_empty_geneval_file_and_a_non_utf8_file_are_named(tmp_path):
    folder = tmp_path / "geneval"
    folder.mkdir()
    listing = folder / "train_metadata.jsonl"
    listing.write_text("")
    assert read_flow_grpo(folder).listing_problems == [
        f"{listing}: no samples listed (the file is empty); expected one example per line"]
    listing.write_bytes(b'{"prompt": "caf\xe9"}\n')
    expected = f"{listing}: byte offset 15 (line 1, byte 0xe9) is not valid UTF-8"
    with pytest.raises(DataError, match=re.escape(expected)):
        read_flow_grpo(folder)


def test_check_says_which_split_file_it_read_and_its_fields(tmp_path, capsys):
    geneval = write_geneval(tmp_path / "geneval")
    assert check.main([str(geneval)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{geneval / 'train_metadata.jsonl'}: prompts set, 4 examples, fields: metadata, prompt, 0 problem(s)")
    assert check.main([str(geneval), "--split", "test"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{geneval / 'test_metadata.jsonl'}: prompts set, 2 examples, fields: metadata, prompt, 0 problem(s)")
    text = write_text_prompts(tmp_path / "ocr")
    assert check.main([str(text)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{text / 'train.txt'}: prompts set, 2 examples, fields: prompt, 0 problem(s)")
    assert check.main([str(text), "--split", "validation"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{text}: no validation.txt or validation_metadata.jsonl for split 'validation' (Flow-GRPO layout); "
        "splits in the folder: ['test', 'train']", f"{text}: 0 examples, 1 problem(s)"]


def test_metadata_survives_a_tfds_round_trip(tmp_path):
    from jax_inpaint_rl.data.tfds_builder import build_tfds

    source = read_flow_grpo(write_geneval(tmp_path / "geneval"))
    stored = open_source(build_tfds(source, tmp_path / "tfds"))
    assert stored.fields == {"prompt", "metadata"}
    assert [stored[i]["metadata"] for i in range(len(stored))] == [source[i]["metadata"] for i in range(4)]
