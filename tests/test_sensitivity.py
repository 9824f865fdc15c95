"""Single-layer sensitivity: agrees with the loss search, with lm-eval's log-likelihoods, and costs about L/2 passes."""

import json

import pytest
from conftest import save_tiny, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.data import Calibration
from layerprune.evaluation.harness import EvalConfig, evaluate
from layerprune.recipes.sensitivity import sensitivity
from layerprune.selection.scoring import calibration_batches, select_by_loss


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen3", seed=5), tiny_tokenizer()


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n\n".join(f"Note {i}: the river runs {'fast ' * (i % 4 + 1)}past the mill." for i in range(30)))
    return path


def test_the_loss_row_equals_the_loss_searchs_single_layer_costs(tiny, calibration_text):
    model, tokenizer = tiny
    calibration = Calibration(data=str(calibration_text), samples=12, seq_len=32, batch_size=4)
    searched = select_by_loss(model, calibration_batches(calibration, tokenizer), 1, allow_final=True)
    costs = {block["layers"][0]: block["loss"] for block in searched.scored}
    config = EvalConfig(tasks=("loss",), limit=12, loss_data=str(calibration_text), seq_len=32, batch_size=4)
    found = sensitivity(model, tokenizer, config).tasks["loss"]
    assert found["documents"] == 12 and len(found["layers"]) == 6
    for row in found["layers"]:
        assert found["full"] + row["change"] == pytest.approx(costs[row["layer"]], rel=1e-5)
        assert row["interval"][0] <= row["change"] <= row["interval"][1]
    assert min(costs, key=costs.get) == min(found["layers"], key=lambda r: r["harm"])["layer"]


def test_the_full_models_log_likelihoods_are_lm_evals(tiny):
    model, tokenizer = tiny
    config = EvalConfig(tasks=("arc_easy",), limit=10, batch_size=4)
    found = sensitivity(model, tokenizer, config)
    documents = evaluate(model, ["arc_easy"], limit=10, tokenizer=tokenizer)["tasks"]["arc_easy"]["documents"]
    assert found.tasks["arc_easy"]["full"] == pytest.approx(sum(documents["loglik"]) / 10, rel=1e-5)
    assert found.forward_passes <= 6 / 2 + 1.5  # about L/2 passes, not L (here L = 6)


def test_the_command_writes_the_map_and_refuses_kld(tiny, tmp_path, calibration_text):
    folder = save_tiny(tiny[0], tmp_path / "model")
    runner = CliRunner()
    args = [
        "sensitivity",
        str(folder),
        "--tasks",
        "arc_easy,loss",
        "--limit",
        "8",
        "--loss-data",
        str(calibration_text),
    ]
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "map")])
    assert done.exit_code == 0, done.stderr
    record = json.loads((tmp_path / "map" / "sensitivity.json").read_text())
    assert set(record["tasks"]) == {"arc_easy", "loss"} and record["num_layers"] == 6
    assert (tmp_path / "map" / "sensitivity.png").stat().st_size > 1000
    assert "most harmful to remove" in done.stdout
    done = runner.invoke(app, [*args, "--batch-size", "3", "--out", str(tmp_path / "map3")])
    batches = 3 + 3  # 8 documents a task, in batches of 3
    assert f"{batches}/{batches} [" in done.stderr.replace("\r", "\n"), "progress counts batches, not tasks"
    refused = runner.invoke(app, ["sensitivity", str(folder), "--tasks", "kld", "--out", str(tmp_path / "other")])
    assert (
        refused.exit_code == 1
        and refused.stderr == "error: sensitivity measures QA tasks and loss; kld is not one of them\n"
    )
    assert not (tmp_path / "other").exists()
