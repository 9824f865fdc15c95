"""The `layerprune` command line: each command parses its options and makes one API call."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import LayerpruneError
from .healing import HealConfig

app = typer.Typer(
    help="Measure which transformer layers are redundant, remove them, heal and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, .gguf file, built-in name or hub id.")]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="Text file, .jsonl, .parquet or built-in corpus (default: coqa).")
]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration documents.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per document (truncated).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Documents per forward pass.")]
QuantizeOpt = Annotated[
    str | None, typer.Option("--quantize", help="Write the result quantized: nf4 or int8 (bitsandbytes).")
]


def user_errors(command: Any) -> Any:
    """Print a LayerpruneError (or a missing file) as one line and exit 1, without a traceback."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (LayerpruneError, FileNotFoundError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return run


def heal_options(prefix: str = ""):
    """Add one CLI option per HealConfig field (help from the field's metadata), gathered into `heal_config`.

    The options model is written once, in HealConfig; `prefix` names them --heal-... where
    they sit beside other options of the same name (as in `prune --heal`).
    """
    hints = typing.get_type_hints(HealConfig)
    fields = dataclasses.fields(HealConfig)

    def option(field: dataclasses.Field) -> inspect.Parameter:
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        declared = f"{flag}/--{prefix}no-{field.name.replace('_', '-')}" if hints[field.name] is bool else flag
        info = typer.Option(declared, help=field.metadata["help"])
        return inspect.Parameter(
            prefix.replace("-", "_") + field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=field.default,
            annotation=Annotated[hints[field.name], info],
        )

    def decorate(command: Any) -> Any:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(prefix.replace("-", "_") + f.name) for f in fields}
            return command(*args, heal_config=HealConfig(**values), **kwargs)

        resolved = typing.get_type_hints(command, include_extras=True)  # this module's annotations are strings
        own = [
            p.replace(annotation=resolved[p.name])
            for p in inspect.signature(command).parameters.values()
            if p.name != "heal_config"
        ]
        params = own + [option(f) for f in fields]
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


@app.command()
@user_errors
def models() -> None:
    """List the built-in models and where their converted checkpoints are cached."""
    from .models import BUILTIN_MODELS, builtin_cache_path

    for name, builtin in BUILTIN_MODELS.items():
        path = builtin_cache_path(name)
        state = str(path) if (path / "config.json").is_file() else f"not converted yet (will be {path})"
        typer.echo(f"{name:14} {builtin.description}\n{'':14} package: {builtin.packages}\n{'':14} cache: {state}")


@app.command()
@user_errors
def analyze(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for distances.json, distances.csv, heatmap.png.")],
    data: DataOpt = None,
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    offload: Annotated[
        bool | None,
        typer.Option("--offload/--no-offload", help="One layer in memory at a time (default: when needed)."),
    ] = None,
    memory_budget: Annotated[
        float | None, typer.Option("--memory-budget", help="With --offload: MiB for weights and states.")
    ] = None,
) -> None:
    """Angular distance d(l, n) for every block and Block Influence for every layer, in one pass."""
    from .analysis import analyze as run_analysis

    result = run_analysis(
        model,
        data=data,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        out=out,
        offload=offload,
        memory_budget_mb=memory_budget,
    )
    typer.echo(f"{result.num_layers} layers, {result.samples} samples of {result.data}")
    typer.echo("n    best block   angular distance")
    for n, start in result.best.items():
        typer.echo(f"{n:<4} {start:>3}..{start + n - 1:<6}  {result.angular[n][start]:.4f}")
    typer.echo(f"wrote {out}/distances.json, distances.csv, heatmap.png")


@app.command()
@user_errors
@heal_options(prefix="heal-")
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="New checkpoint folder (must not exist).")],
    layers: Annotated[str | None, typer.Option("--layers", help="Layers to remove: 20-27 or 3,5,7-9.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of layers to remove.")] = None,
    fraction: Annotated[float | None, typer.Option("--fraction", help="Fraction of layers to remove.")] = None,
    strategy: Annotated[
        str, typer.Option("--strategy", help="angular, deepest, bi, loss, angular-rerank or iterative.")
    ] = "angular",
    candidates: Annotated[int, typer.Option("--candidates", help="angular-rerank: blocks re-scored by loss.")] = 5,
    analysis: Annotated[
        Path | None, typer.Option("--analysis", help="distances.json from `analyze` (else computed).")
    ] = None,
    allow_final: Annotated[bool, typer.Option("--allow-final", help="Allow removing the final layer.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    data: DataOpt = None,
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    heal: Annotated[bool, typer.Option("--heal", help="Heal the pruned model (QLoRA) into --out.")] = False,
    save_adapter: Annotated[bool, typer.Option("--save-adapter", help="With --heal: keep the adapter.")] = False,
    quantize: QuantizeOpt = None,
    heal_config: HealConfig | None = None,
) -> None:
    """Remove layers and write a standard Hugging Face checkpoint, streaming tensors on disk.

    With --heal, the pruned model is healed (see `layerprune heal`, options --heal-...) into --out.
    With --quantize, --out holds the result quantized (see `layerprune export`).
    """
    import json

    from .healing import prune_and_heal
    from .surgery import prune as run_prune

    chained = {"config": heal_config, "save_adapter": save_adapter} if heal else {}
    make = partial(
        prune_and_heal if heal else run_prune,
        model,
        **chained,
        layers=layers,
        n=n,
        fraction=fraction,
        strategy=strategy,
        analysis=analysis,
        candidates=candidates,
        allow_final=allow_final,
        data=data,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
    )
    folder = _maybe_quantized(out, quantize, overwrite, make)
    record = json.loads((folder / "layerprune.json").read_text())
    removed = record["removed_layers"]
    typer.echo(
        f"removed {len(removed)} of {record['num_layers_before']} layers ({record['strategy']}): {removed}\n"
        f"wrote {folder} ({record['num_layers_after']} layers" + (f", {quantize})" if quantize else ")")
    )
    if heal:
        _echo_healing(record["healing"])


def _maybe_quantized(out: Path, scheme: str | None, overwrite: bool, make: Callable[..., Path]) -> Path:
    """`make(out)`, or with a scheme, `make` into staging and its quantized form into `out`."""
    if scheme is None:
        return make(out, overwrite=overwrite)
    from .deployment import then_quantize

    return then_quantize(out, scheme, lambda staging: make(staging, overwrite=False), overwrite=overwrite)


def _echo_healing(healing: dict[str, Any]) -> None:
    typer.echo(
        f"healed ({healing['method']}, {healing['config']['steps']} steps): validation loss "
        f"{healing['validation_loss_before']:.3f} -> {healing['validation_loss_after']:.3f}, "
        f"{healing['tokens_per_second']:.0f} tokens/s, {healing['seconds']:.0f} s"
    )


@app.command()
@user_errors
@heal_options()
def heal(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Healed checkpoint folder (must not exist).")],
    save_adapter: Annotated[bool, typer.Option("--save-adapter", help="Also keep the LoRA adapter.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    quantize: QuantizeOpt = None,
    heal_config: HealConfig | None = None,
) -> None:
    """Heal a (pruned) model with QLoRA, then merge into its unquantized weights.

    Run again after an interruption, it resumes from the last checkpoint. For several GPUs:
    accelerate launch -m layerprune heal MODEL --out DIR ...
    With --quantize, --out holds the merged model quantized (see `layerprune export`).
    """
    import json

    from .healing import heal as run_heal

    make = partial(run_heal, model, config=heal_config, save_adapter=save_adapter)
    folder = _maybe_quantized(out, quantize, overwrite, make)
    _echo_healing(json.loads((folder / "layerprune.json").read_text())["healing"])
    typer.echo(f"wrote {folder}" + (f" ({quantize})" if quantize else ""))


@app.command()
@user_errors
def evaluate(
    model: ModelArg,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: offline tasks, `loss`, or lm-eval names.")] = (
        "sciq,piqa,arc_easy,loss"
    ),
    limit: Annotated[int | None, typer.Option("--limit", help="First N documents of each task.")] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", help="Few-shot examples (default: 5 for mmlu, else 0).")
    ] = None,
    batch_size: BatchOpt = 8,
    loss_data: Annotated[
        str | None, typer.Option("--loss-data", help="Held-out text for `loss` (default: lambada).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write results.json here.")] = None,
) -> None:
    """QA accuracy through lm-eval-harness (offline data) and held-out next-token loss."""
    from .evaluation import evaluate as run_evaluation

    record = run_evaluation(
        model, tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, loss_data=loss_data, out=out
    )
    typer.echo(f"{'task':14} {'n':>6} {'acc':>14} {'acc_norm':>14} {'chance':>7}")
    for name, metrics in record["tasks"].items():
        if name == "loss":
            m = metrics
            typer.echo(
                f"{'loss':14} {m['n']:>6} loss {m['loss']:.3f} ± {m['loss_stderr'] or float('nan'):.3f}, "
                f"normalized {m['loss_normalized']:.3f}, "
                f"perplexity {m['perplexity']:.1f} ({m['tokens']} tokens of {m['data']})"
            )
            continue
        cells = [
            f"{metrics[m]:.3f} ± {metrics[m + '_stderr'] or float('nan'):.3f}" if m in metrics else "-"
            for m in ("acc", "acc_norm")
        ]
        chance = f"{metrics['chance']:.3f}" if "chance" in metrics else "-"
        typer.echo(f"{name:14} {metrics['n']:>6} {cells[0]:>14} {cells[1]:>14} {chance:>7}")
    typer.echo(f"{record['seconds']:.0f} s" + (f"; wrote {out}" if out else ""))


def _numbers(text: str | None, kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip()) if text else ()
    except ValueError as err:
        raise LayerpruneError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from err


@app.command()
@user_errors
@heal_options(prefix="heal-")
def sweep(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Sweep folder (resumed if it exists).")],
    fractions: Annotated[str | None, typer.Option("--fractions", help="Fractions removed: 0,0.1,0.2,...")] = None,
    n: Annotated[str | None, typer.Option("--n", help="Or numbers of layers removed: 0,2,4,...")] = None,
    strategies: Annotated[
        str, typer.Option("--strategies", help="Any of the `prune` strategies, comma-separated.")
    ] = "angular,deepest",
    heal: Annotated[bool, typer.Option("--heal/--no-heal", help="Also heal every pruned point.")] = True,
    tasks: Annotated[str, typer.Option("--tasks", help="Tasks, as in `evaluate`.")] = "sciq,piqa,arc_easy,loss",
    limit: Annotated[int | None, typer.Option("--limit", help="Documents per task.")] = 100,
    data: DataOpt = None,
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    heal_config: HealConfig | None = None,
) -> None:
    """The paper's experiment: prune by each strategy at each fraction, heal, evaluate, report."""
    from .sweep import SweepConfig, run_sweep

    config = SweepConfig(
        ns=_numbers(n, int),
        fractions=_numbers(fractions, float),
        strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
        heal=heal,
        heal_config=heal_config,
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        limit=limit,
        data=data or "coqa",
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
    )
    folder = run_sweep(model, out, config)
    typer.echo(f"wrote {folder}/results.csv, results.json and {folder / 'report.html'}")


@app.command()
@user_errors
def report(
    folder: Annotated[Path, typer.Argument(help="A sweep folder.")],
    tolerance: Annotated[float, typer.Option("--tolerance", help="Relative accuracy loss accepted.")] = 0.05,
) -> None:
    """Rebuild report.html from a sweep's stored results (no model is run)."""
    from .report import write_report
    from .sweep import collect

    collect(folder)
    typer.echo(f"wrote {write_report(folder, tolerance)}")


@app.command()
@user_errors
def bench(
    models: Annotated[list[str], typer.Argument(help="Models to compare (folders, .gguf, built-in names).")],
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length for prefill.")] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated for decode.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences generated at once.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats after one warm-up.")] = 3,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for bench.json and bench.png.")] = None,
) -> None:
    """Inference cost side by side: parameters, size, peak memory, prefill, decode, time to first token."""
    import json

    from .deployment import InferenceSettings, benchmark
    from .plots import inference_bars

    settings = InferenceSettings(prompt_tokens, new_tokens, batch_size, repeats)
    results = benchmark(models, settings)
    typer.echo(
        f"{'model':28} {'params M':>9} {'disk MB':>8} {'peak MB':>8} {'prefill tok/s':>14} "
        f"{'decode tok/s':>13} {'TTFT s':>7}"
    )
    for r in results:
        typer.echo(
            f"{(Path(r['model']).name or r['model'])[:28]:28} {r['parameters'] / 1e6:>9.1f} "
            f"{r['disk_bytes'] / 2**20:>8.0f} {r['peak_memory_mb']:>8.0f} "
            f"{r['prefill_tokens_per_s']['median']:>14.1f} {r['decode_tokens_per_s']['median']:>13.1f} "
            f"{r['time_to_first_token_s']['median']:>7.3f}"
        )
    typer.echo(f"medians of {repeats} repeats; prompt {prompt_tokens} tokens, {new_tokens} new, batch {batch_size}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"settings": vars(settings), "models": results}, indent=1))
        inference_bars(results, out / "bench.png")
        typer.echo(f"wrote {out}/bench.json and bench.png")


@app.command()
@user_errors
def export(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Quantized checkpoint folder (must not exist).")],
    quantize: Annotated[str, typer.Option("--quantize", help="nf4 or int8 (bitsandbytes).")] = "nf4",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Write a quantized checkpoint (bitsandbytes NF4 or int8) that transformers loads directly."""
    from .deployment import export_quantized

    typer.echo(f"wrote {export_quantized(model, out, quantize, overwrite=overwrite)} ({quantize})")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so SIGTERM (a scheduler, `kill`) cleans up like Ctrl-C: no partial output


def main() -> None:
    """Entry point of the `layerprune` script."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="layerprune")


if __name__ == "__main__":
    sys.exit(main())
