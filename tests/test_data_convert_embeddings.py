"""tools/convert_embeddings.py: .pt text embeddings become .npy / .safetensors the library reads."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_inpaint_rl.data import open_source  # noqa: E402
from jax_inpaint_rl.data.formats import read_embedding  # noqa: E402
from tools import convert_embeddings  # noqa: E402
from tests.test_data_formats import box_mask_array, image_array, save_png  # noqa: E402


def test_files_mode_handles_bf16_dicts_and_squeeze(tmp_path):
    values = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6)
    torch.save(values.to(torch.bfloat16), tmp_path / "a.pt")
    torch.save({"prompt_embeds": values, "pooled": values[:, 0]}, tmp_path / "b.pt")
    assert convert_embeddings.main([str(tmp_path / "a.pt"), "--squeeze"]) == 0
    np.testing.assert_array_equal(read_embedding(tmp_path / "a.npy"), values[0].numpy())
    with pytest.raises(SystemExit, match="pass --key"):
        convert_embeddings.main([str(tmp_path / "b.pt")])
    convert_embeddings.main([str(tmp_path / "b.pt"), "--key", "prompt_embeds", "--format", "safetensors"])
    np.testing.assert_array_equal(read_embedding(tmp_path / "b.safetensors"), values.numpy())


def test_listing_mode_rewrites_paths_and_the_result_loads(tmp_path):
    (tmp_path / "data").mkdir()
    save_png(tmp_path / "data/0.png", image_array(0))
    save_png(tmp_path / "data/0_mask.png", box_mask_array())
    embedding = torch.randn(4, 8)
    torch.save(embedding, tmp_path / "data/0.pt")
    record = {"image_path": "0.png", "mask_path": "0_mask.png", "prompt": "p", "t5_embedding_path": "0.pt"}
    (tmp_path / "data/train.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(Exception, match="convert_embeddings.py"):
        open_source(tmp_path / "data/train.jsonl")[0]
    out = tmp_path / "train_converted.jsonl"  # another folder: every path is rewritten relative to it
    assert convert_embeddings.main([str(tmp_path / "data/train.jsonl"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["t5_embedding_path"] == "data/0.npy"
    example = open_source(out)[0]
    np.testing.assert_array_equal(example["embeddings"]["t5"], embedding.numpy())
    np.testing.assert_array_equal(example["image"], image_array(0))
