"""Settings dataclasses seen flat: one option per field on the CLI and one keyword per field in the API."""

import dataclasses

import pytest
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.config import build, flat_fields, flatten
from layerprune.data import Calibration
from layerprune.errors import LayerpruneError
from layerprune.evaluation.harness import EvalConfig
from layerprune.evaluation.speed import InferenceSettings
from layerprune.healing.lora import HealConfig
from layerprune.recipes.pipeline import PruneConfig
from layerprune.runtime.devices import Placement
from layerprune.sweep.run import SweepConfig


def test_nested_configs_are_flat_under_their_prefix_and_build_back():
    names = [f.name for f in flat_fields(SweepConfig)]
    assert {"data", "samples", "seq_len", "batch_size", "heal_steps", "heal_quant", "ns"} <= set(names)
    assert len(names) == len(set(names)), "flat names are unique"
    config = build(SweepConfig, {"ns": (0, 2), "heal_steps": 7, "samples": 3})
    assert config.heal_config.steps == 7 and config.calibration.samples == 3 and config.calibration.seq_len == 256
    assert build(SweepConfig, flatten(config)) == config


def test_an_unknown_setting_names_the_closest_one():
    with pytest.raises(LayerpruneError, match="unknown setting 'sample' for PruneConfig; did you mean samples"):
        build(PruneConfig, {"n": 2, "sample": 3})


@pytest.mark.parametrize(
    ("command", "config", "prefix"),
    [
        ("analyze", Calibration, ""),
        ("analyze", Placement, ""),
        ("prune", PruneConfig, ""),
        ("prune", HealConfig, "heal-"),
        ("heal", HealConfig, ""),
        ("evaluate", EvalConfig, ""),
        ("sweep", SweepConfig, ""),
        ("bench", InferenceSettings, ""),
        ("bench", Placement, ""),
    ],
)
def test_every_setting_is_an_option_with_its_help(command, config, prefix):
    """A new setting is one dataclass field: it appears in every command that takes its config."""
    import re

    text = re.sub(r"\s+", " ", CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"}).stdout)
    for field in flat_fields(config):
        assert f"--{prefix}{field.flag}" in text, field.name
        assert " ".join(field.help.split()[:3]) in text, field.name


def test_a_calibration_field_reaches_the_analysis_from_the_cli(tmp_path, monkeypatch):
    """The option --samples is built into the Calibration that analyze receives, untouched on the way."""
    import layerprune.cli

    seen = []
    monkeypatch.setattr(layerprune.cli, "run_analysis", lambda model, calibration, **kw: seen.append(calibration))
    CliRunner().invoke(app, ["analyze", "m", "--out", str(tmp_path / "a"), "--samples", "5", "--seq-len", "9"])
    assert seen == [Calibration(samples=5, seq_len=9)]
    assert [f.name for f in dataclasses.fields(Calibration)] == ["data", "samples", "seq_len", "batch_size"]
