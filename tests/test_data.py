"""Text sources and their batching: files, built-in corpora, hub datasets; bad data in one line."""

import json

import pytest
import torch
from conftest import tiny_tokenizer

from layerprune.data import BUILTIN_CORPORA, Calibration, load_documents, token_batches
from layerprune.errors import LayerpruneError


def test_files_of_each_kind_give_their_unique_documents(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("first document\n\n  second  \n\n\nfirst document\n")
    assert load_documents(text) == ["first document", "second"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "", "c d"])))
    assert load_documents(jsonl) == ["a b", "c d"]
    parquet = tmp_path / "docs.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "z"]}), parquet)
    assert load_documents(parquet) == ["x y", "z"]


@pytest.mark.parametrize("line", ['"just a string"', "[1, 2]", '{"title": "no text field"}', "{not json"])
def test_jsonl_lines_that_are_not_documents_are_refused_in_one_line(tmp_path, line):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(LayerpruneError, match=f"could not read documents from {path}") as err:
        load_documents(path)
    assert "\n" not in str(err.value)


def test_the_builtin_corpora_are_real_text():
    for name in BUILTIN_CORPORA:
        documents = load_documents(name)
        assert len(documents) > 400 and sum(len(d.split()) for d in documents) > 100_000


def test_batches_are_right_padded_and_masked():
    batches = token_batches(tiny_tokenizer(), ["a longer document here", "short"], samples=2, seq_len=8, batch_size=2)
    (batch,) = batches
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0] * 2]  # BOS + 5 bytes, then padding
    assert torch.equal(batch["input_ids"][1, 6:], torch.zeros(2, dtype=torch.long))


def test_calibration_settings_are_checked_when_built():
    with pytest.raises(LayerpruneError, match="at least 1"):
        Calibration(samples=0)
    assert Calibration(data="lambada", samples=3).batches(tiny_tokenizer())[0]["input_ids"].shape[0] == 3


def test_hub_dataset_names_are_streamed(monkeypatch):
    import datasets

    from layerprune.data import load_documents

    calls = []

    def fake_load_dataset(path, config, split, streaming):
        calls.append((path, config, split, streaming))
        return iter([{"text": "first document"}, {"text": ""}, {"text": "second document"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_documents("allenai/c4:en") == ["first document", "second document"]
    assert calls == [("allenai/c4", "en", "train", True)]

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LayerpruneError, match="hub dataset could not be streamed"):
        load_documents("someone/corpus")
