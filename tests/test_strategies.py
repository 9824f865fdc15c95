"""The strategy registry: every strategy chooses valid layers, and the CLI, sweep and report read it."""

import json

import pytest
from conftest import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.data import token_batches
from layerprune.errors import LayerpruneError
from layerprune.measure.analysis import AnalysisResult, layer_distances
from layerprune.selection.strategies import MODEL, STRATEGIES, Request, get_strategy, select_layers

DOCS = [f"Calibration text number {i}: the quick brown fox jumps over the lazy dog again." for i in range(6)]


@pytest.fixture(scope="module")
def request_for():
    """A Request with everything any strategy may need, for a tiny model."""
    model = tiny_model("llama", seed=3)
    batches = token_batches(tiny_tokenizer(), DOCS, 6, 40, 3)
    angular, bi = layer_distances(model, batches, progress=False)
    analysis = AnalysisResult(num_layers=6, angular=angular, block_influence=bi)
    return lambda n, **kw: Request(6, n, analysis=analysis, model=model, batches=batches, candidates=2, **kw)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("n", [1, 3])
def test_every_strategy_chooses_n_valid_layers_and_keeps_the_final_one(name, n, request_for):
    strategy = STRATEGIES[name]
    choice = strategy.choose(request_for(n))
    assert len(choice.layers) == n == len(set(choice.layers))
    assert all(0 <= layer < 5 for layer in choice.layers), "the final layer (5) is kept"
    assert strategy.choose_many(request_for(n), [1, n])[n].layers == choice.layers
    assert strategy.help and strategy.cost and strategy.needs <= {"analysis", "model"}


def test_a_strategy_that_needs_the_model_says_so_without_it(request_for):
    needing = [s for s in STRATEGIES.values() if MODEL in s.needs]
    assert needing
    for strategy in needing:
        with pytest.raises(LayerpruneError, match="needs the model"):
            strategy.choose(Request(6, 2, analysis=request_for(2).analysis))


def test_an_unknown_strategy_names_the_closest_and_the_others():
    with pytest.raises(
        LayerpruneError, match=r"unknown strategy 'angualr'\. Did you mean angular\? Choose one of"
    ) as err:
        get_strategy("angualr")
    assert all(name in str(err.value) for name in STRATEGIES)


def test_the_cli_lists_every_registered_strategy():
    listing = CliRunner().invoke(app, ["strategies"])
    assert listing.exit_code == 0
    helps = {command: CliRunner().invoke(app, [command, "--help"]).stdout for command in ("prune", "sweep")}
    for name, strategy in STRATEGIES.items():
        assert name in listing.stdout and strategy.cost in listing.stdout
        assert all(name in text for text in helps.values()), name


def test_select_layers_by_strategy():
    analysis = AnalysisResult(
        num_layers=6,
        angular={
            1: [0.9, 0.5, 0.2, 0.4, 0.3, 0.1],
            2: [0.9, 0.6, 0.3, 0.5, 0.2],
            3: [0.8, 0.7, 0.1, 0.4],
            4: [0.9, 0.8, 0.7],
            5: [0.9, 0.9],
        },
        block_influence=[0.9, 0.3, 0.1, 0.5, 0.2, 0.05],
    )
    assert select_layers(6, n=2, strategy="deepest") == [3, 4]
    assert select_layers(6, n=3, strategy="angular", analysis=analysis) == [2, 3, 4]
    assert select_layers(6, n=2, strategy="angular", analysis=analysis) == [2, 3]  # 4..5 holds the final layer
    assert select_layers(6, n=2, strategy="angular", analysis=analysis, allow_final=True) == [4, 5]
    assert select_layers(6, n=1, strategy="angular", analysis=analysis) == [2]  # 5 is final
    assert select_layers(6, n=1, strategy="angular", analysis=analysis, allow_final=True) == [5]
    assert select_layers(6, n=2, strategy="bi", analysis=analysis) == [2, 4]
    assert select_layers(6, fraction=0.5, strategy="deepest") == [2, 3, 4]
    assert select_layers(6, layers="0,2") == [0, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=0),
        dict(n=6),
        dict(n=-1),
        dict(fraction=1.0),
        dict(fraction=0.01),
        dict(layers=[6]),
        dict(layers="0-5"),
        dict(layers=[5]),
        dict(n=2, fraction=0.3),
        dict(n=2, strategy="angular"),
        dict(n=2, strategy="nope"),
    ],
)
def test_select_layers_refuses_impossible_requests(kwargs):
    with pytest.raises(LayerpruneError) as err:
        select_layers(6, **kwargs)
    assert "\n" not in str(err.value)


def test_random_is_a_seeded_baseline_that_every_consumer_sees(tmp_path):
    from conftest import save_tiny

    from layerprune.config import build
    from layerprune.recipes.pipeline import prune
    from layerprune.sweep.run import SweepConfig, run_sweep

    draws = {seed: STRATEGIES["random"].choose(Request(30, 8, seed=seed)).layers for seed in range(20)}
    assert all(len(set(d)) == 8 and max(d) < 29 for d in draws.values()), "8 distinct layers, the final one kept"
    assert len({tuple(d) for d in draws.values()}) > 15, "different seeds draw differently"
    assert STRATEGIES["random"].choose(Request(30, 8, seed=3)).layers == draws[3], "the same seed draws the same"
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    written = prune(src, tmp_path / "out", n=2, strategy="random", seed=3)
    assert written.removed == STRATEGIES["random"].choose(Request(6, 2, seed=3)).layers
    assert written.record["selection"] == {"seed": 3}
    assert "random" in CliRunner().invoke(app, ["prune", "--help"]).stdout
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(DOCS * 4))
    config = build(SweepConfig, {"ns": (0, 2), "strategies": ("random",), "heal": False, "tasks": ("loss",),
                                 "limit": 2, "data": str(text), "samples": 4, "seq_len": 32})  # fmt: skip
    sweep = run_sweep(src, tmp_path / "sweep", config, progress=False).path
    rows = json.loads((sweep / "results.json").read_text())
    assert [r["strategy"] for r in rows] == ["full", "random"] and rows[1]["layers_removed"] == draws_for_6(0)
    assert STRATEGIES["random"].help in (sweep / "report.html").read_text()


def draws_for_6(seed):
    return STRATEGIES["random"].choose(Request(6, 2, seed=seed)).layers
