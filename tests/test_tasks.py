"""A task is one object: a new metric on held-out text is one class and one registry entry, and
evaluate, the one-pass engine, merging rounds, pairing and the sweep's table all take it."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from layerprune.cut.surgery import pruned_in_place
from layerprune.evaluation.harness import EvalConfig, Tolerance, evaluate, judge
from layerprune.evaluation.one_pass import FULL, OnePass, evaluate_variants
from layerprune.evaluation.tasks import TEXT_TASKS, HeldOutLoss, task_of


class NextTokenHits(HeldOutLoss):
    """How often the model's top token is the text's next token: written here, in one class."""

    higher_is_better = True
    metric = "hit_rate"
    value_column, weight_column = "hits", "tokens"
    figures = ("hit_rate", "n")

    def rows(self, logits, reference, batch):
        mask = batch["attention_mask"][:, 1:].bool().to(logits.device)
        hits = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:].to(logits.device)) & mask
        return list(zip(hits.sum(1).tolist(), mask.sum(1).tolist(), strict=True))

    def result(self, ids, rows, vocab, data):
        return self.summary({"id": ids, "hits": [h for h, _ in rows], "tokens": [t for _, t in rows]}, {}, {})

    def summary(self, documents, old, new):
        rate = sum(documents["hits"]) / sum(documents["tokens"])
        return {"hit_rate": rate, "n": len(documents["id"]), "documents": documents}


@pytest.fixture
def hits(monkeypatch):
    monkeypatch.setitem(TEXT_TASKS, "hits", NextTokenHits("hits"))
    return TEXT_TASKS["hits"]


def texts(tmp_path, count=10):
    path = tmp_path / "heldout.txt"
    path.write_text(
        "\n\n".join(f"Document {i}: the fox {'jumps ' * (i % 4 + 1)}over the lazy dog." for i in range(count))
    )
    return path


def direct_hits(model, tokenizer, path, count):
    """Each document's hits and tokens, one document at a time, without the task class."""
    documents = path.read_text().split("\n\n")[:count]
    found = []
    for text in documents:
        ids = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            top = model(input_ids=ids).logits[0, :-1].argmax(-1)
        found.append((int((top == ids[0, 1:]).sum()), ids.shape[1] - 1))
    return found


def test_a_new_held_out_metric_is_one_class_that_evaluate_and_the_engine_take(tmp_path, hits):
    model, tokenizer = tiny_model("llama", seed=5), tiny_tokenizer()
    path = texts(tmp_path)
    config = EvalConfig(tasks=("hits", "loss"), loss_data=str(path), limit=8, batch_size=3)
    alone = evaluate(model, config=config, tokenizer=tokenizer)["tasks"]
    direct = direct_hits(model, tokenizer, path, 8)
    assert alone["hits"]["documents"]["hits"] == [h for h, _ in direct]
    assert alone["hits"]["hit_rate"] == pytest.approx(sum(h for h, _ in direct) / sum(t for _, t in direct))
    assert alone["loss"]["n"] == 8  # the other text task, from the same pass

    engine = OnePass(model, [(1, 2)])
    together = evaluate_variants(engine, tokenizer, config, {FULL: None, (1, 2): None})
    assert together[FULL]["tasks"]["hits"]["documents"] == alone["hits"]["documents"]
    with pruned_in_place(model, [1, 2]):
        cut = evaluate(model, config=config, tokenizer=tokenizer)["tasks"]["hits"]
    assert together[(1, 2)]["tasks"]["hits"]["documents"] == cut["documents"]

    first = evaluate(model, config=config, tokenizer=tokenizer, documents={"hits": ["0", "1", "2"]})["tasks"]["hits"]
    rest = evaluate(model, config=config, tokenizer=tokenizer, documents={"hits": [str(i) for i in range(3, 8)]})
    assert hits.merge(first, rest["tasks"]["hits"])["hit_rate"] == pytest.approx(alone["hits"]["hit_rate"])

    same = judge("hits", alone["hits"], alone["hits"], Tolerance())  # paired on its own column
    assert same.harm == 0 and same.comparison.documents == 8
    assert hits.columns() == ["hit_rate", "n"] and hits.table(alone["hits"])["n"] == 8


def test_each_built_in_kind_is_found_by_name():
    assert task_of("loss").text and not task_of("loss").reference and not task_of("loss").higher_is_better
    assert task_of("kld").text and task_of("kld").reference
    assert not task_of("piqa").text and task_of("piqa").higher_is_better
    assert task_of("piqa").columns()[0] == "piqa_acc"
    assert task_of("loss").columns() == ["loss", "loss_stderr", "loss_normalized", "perplexity"]
