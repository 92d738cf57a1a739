"""Text sources and calibration windows."""

from __future__ import annotations

import json

import polars as pl
import pytest

from bonsai.stages.calibration import cut_windows
from bonsai.stages.core.data import documents, source_digest
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import load_tokenizer

import tiny


def texts(spec: str) -> list[str]:
    return [t for t, _, _ in documents(spec)]


def test_txt_jsonl_parquet_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta\ngamma\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pl.DataFrame({"text": ["three", "", "four"], "id": [1, 2, 3]}).write_parquet(tmp_path / "c.parquet")
    assert texts(str(tmp_path / "a.txt")) == ["alpha beta\ngamma\n"]
    assert texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    assert texts(str(tmp_path / "c.parquet")) == ["three", "four"]
    assert texts(str(tmp_path)) == ["alpha beta\ngamma\n", "one", "two", "three", "four"]


def test_big_text_files_come_in_blocks_with_one_start_and_one_end(tmp_path, monkeypatch):
    import bonsai.stages.core.data as data

    monkeypatch.setattr(data, "_TXT_BLOCK", 10)
    (tmp_path / "big.txt").write_text("".join(f"line {i}\n" for i in range(10)))
    blocks = list(documents(str(tmp_path / "big.txt")))
    assert "".join(t for t, _, _ in blocks) == (tmp_path / "big.txt").read_text()
    assert [s for _, s, _ in blocks].count(True) == 1 and blocks[0][1]
    assert [e for _, _, e in blocks].count(True) == 1 and blocks[-1][2]


def test_saved_dataset_folder_via_hf_prefix(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["first doc", "second doc"]}).save_to_disk(str(tmp_path / "ds"))
    spec = f"hf:{tmp_path / 'ds'}"
    assert texts(spec) == ["first doc", "second doc"]
    assert source_digest(spec) == source_digest(spec)


def test_local_dataset_folder_via_hf_prefix(tmp_path):
    """hf:PATH goes through datasets.load_dataset, as a hub name in the local cache would."""
    (tmp_path / "corpus" / "data").mkdir(parents=True)
    pl.DataFrame({"text": ["x y", "z"]}).write_parquet(tmp_path / "corpus/data/train-00000-of-00001.parquet")
    assert texts(f"hf:{tmp_path / 'corpus'}") == ["x y", "z"]
    assert texts(f"hf:{tmp_path / 'corpus'}::train") == ["x y", "z"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: (p / "x.csv").write_text("a,b"), "unsupported file type"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "no text"}\n'), "no string field 'text'"),
        (lambda p: (p / "x.jsonl").write_text("not json\n"), "line 1 is not JSON"),
        (lambda p: pl.DataFrame({"body": ["x"]}).write_parquet(p / "x.parquet"), "no 'text' column"),
    ],
)
def test_bad_sources_are_one_clear_line(tmp_path, make, message):
    make(tmp_path)
    candidates = [p for p in tmp_path.iterdir()]
    spec = str(candidates[0]) if candidates else str(tmp_path / "missing.txt")
    with pytest.raises(UserError, match=message):
        list(documents(spec))


def test_hf_dataset_not_on_disk_says_how_to_get_it():
    with pytest.raises(UserError, match="not readable from local disk"):
        list(documents("hf:surely-not-a-cached-dataset-name"))


def test_content_changes_the_digest(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one")
    first = source_digest(str(path))
    path.write_text("two")
    assert source_digest(str(path)) != first


def test_a_text_is_read_once_then_known_by_its_size_and_time(tmp_path, monkeypatch):
    """The digest is what it always was (runs record it); a second call reads no byte: a file whose
    bytes changed under the same size and time gives the remembered digest."""
    import hashlib
    import os
    import time

    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "a.txt"
    path.write_text("one two three\n")
    past = time.time_ns() - 10**10  # older than the racy window, so it is remembered
    os.utime(path, ns=(past, past))
    assert source_digest(str(path)) == hashlib.sha256(b"a.txt\0one two three\n").hexdigest()
    path.write_text("one two three\n".upper())
    os.utime(path, ns=(past, past))
    assert source_digest(str(path)) == hashlib.sha256(b"a.txt\0one two three\n").hexdigest()
    os.utime(path, ns=(past + 1, past + 1))
    assert source_digest(str(path)) == hashlib.sha256(b"a.txt\0ONE TWO THREE\n").hexdigest()


def test_windows_are_contiguous_and_documents_are_delimited(zoo, tmp_path):
    tok = load_tokenizer(zoo["llama"])
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": tiny.text(5, seed=i)}) for i in range(4)))
    windows, read = cut_windows(tok, str(path), seq_len=16, pool=1000)
    stream = [t for w in windows for t in w]
    assert all(len(w) == 16 for w in windows) and len(stream) <= read < len(stream) + 16
    # each document starts with BOS and ends with EOS (the same token for this tokenizer)
    assert stream.count(tok.eos_token_id) >= 4
    limited, _ = cut_windows(tok, str(path), seq_len=16, pool=3)
    assert limited == windows[:3]
