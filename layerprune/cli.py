"""The `layerprune` command line: each command parses its options and makes one API call.

Options come from the settings dataclasses (`Calibration`, `PruneConfig`, `HealConfig`,
`EvalConfig`, `SweepConfig`, `InferenceSettings`): `config_options` turns each field into an
option with the field's help, default and choices, and hands the command the built config.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from functools import partial, wraps
from pathlib import Path
from typing import Annotated, Any

import rich.markup
import typer
from typer.core import TyperGroup

try:
    from typer._click import exceptions as click_errors  # typer vendors its own click from 0.2x
except ImportError:  # pragma: no cover - an older typer on click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]

from layerprune._version import __version__
from layerprune.config import build, flat_fields
from layerprune.data import Calibration
from layerprune.errors import USER_ERROR, LayerpruneError, LayerpruneWarning, describe, one_line
from layerprune.evaluation.harness import EvalConfig, Tolerance
from layerprune.evaluation.harness import evaluate as run_evaluation
from layerprune.evaluation.speed import InferenceSettings, benchmark
from layerprune.evaluation.tasks import task_of
from layerprune.healing.lora import HealConfig
from layerprune.healing.lora import heal as run_heal
from layerprune.measure.analysis import analyze as run_analysis
from layerprune.recipes.export import export_gguf, export_quantized
from layerprune.recipes.pipeline import PruneConfig, output_format, prune_and_heal, then_gguf, then_quantize
from layerprune.recipes.pipeline import prune as run_prune
from layerprune.recipes.sensitivity import run_sensitivity
from layerprune.runtime.devices import Placement, end_processes, is_main_process
from layerprune.runtime.models import BUILTIN_MODELS, builtin_cache_path, cache_dir, cache_entries, clear_cache
from layerprune.selection.strategies import STRATEGIES
from layerprune.sweep.report import answers, write_report
from layerprune.sweep.run import Shard, SweepConfig, collect, run_sweep


class _Commands(TyperGroup):
    """The command group, with option errors (an unknown option, a bad value, a missing argument)
    as one line and exit 1, like every other user error, instead of click's box and exit 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:  # fmt: skip
        known = {o for command in self.commands.values() for p in command.params for o in (*p.opts, *p.secondary_opts)}
        args = _dashed(sys.argv[1:] if args is None else list(args), known)
        given: dict[str, Any] = dict(args=args, prog_name=prog_name, complete_var=complete_var,
                                     windows_expand_args=windows_expand_args)  # fmt: skip
        if not standalone_mode:
            return super().main(**given, standalone_mode=False, **extra)
        try:
            code = super().main(**given, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as err:
            typer.echo(err.ctx.get_help() if err.ctx else err.format_message())
            sys.exit(0)
        except click_errors.UsageError as err:
            where = f"; see `{err.ctx.command_path} --help`" if err.ctx else ""
            typer.echo(f"error: {one_line(err.format_message()).rstrip('.')}{where}", err=True)
            sys.exit(USER_ERROR)
        except click_errors.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except typer.Abort:  # Ctrl-C before a command started
            typer.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if type(code) is int else 0)  # an exit code (typer.Exit), or a command's return value


def _dashed(args: list[str], known: set[str]) -> list[str]:
    """Options as lm-eval and transformers users type them: `--batch_size` is `--batch-size`, for the
    `known` options only (a value such as `--out --a_` stays as it is)."""
    dashed: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return dashed + args[index:]
        name, equals, value = arg.partition("=")
        dashed.append(name.replace("_", "-") + equals + value if name.replace("_", "-") in known else arg)
    return dashed


app = typer.Typer(
    cls=_Commands,
    help="Measure which transformer layers are redundant, remove them, heal and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, .gguf file, built-in name or hub id.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
QuantizeOpt = Annotated[
    str | None, typer.Option("--quantize", help="Write the result quantized: nf4 or int8 (bitsandbytes).")
]
SaveAdapterOpt = Annotated[bool, typer.Option("--save-adapter", help="Also keep the LoRA adapter.")]


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """The error boundary: any expected failure is one `error: ...` line on stderr and exit 1; a
    bug is one line too, with exit 2 (LAYERPRUNE_DEBUG=1 shows every traceback). Our warnings
    (input accepted after a correction) are printed as `warning: ...` lines once the command has
    succeeded; when it fails, the error is the one line."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        notes: list[str] = []

        def show(message: Any, category: type[Warning], *rest: Any, **options: Any) -> None:
            if issubclass(category, LayerpruneWarning):
                notes.append(str(message))
            elif verbose:
                default_show(message, category, *rest, **options)

        default_show = warnings.showwarning
        verbose = bool(os.environ.get("LAYERPRUNE_VERBOSE") or os.environ.get("LAYERPRUNE_DEBUG"))
        if not verbose:
            quiet_libraries()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", LayerpruneWarning)
                warnings.showwarning = show
                result = command(*args, **kwargs)
            for note in notes:
                typer.echo(f"warning: {note}", err=True)
            return result
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            if os.environ.get("LAYERPRUNE_DEBUG"):
                raise
            message, code = describe(err)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None

    return run


LIBRARY_LOGGERS = ("transformers", "bitsandbytes", "peft", "lm_eval", "lm-eval", "accelerate", "datasets", "torch")


def quiet_libraries() -> None:
    """Success is quiet: the libraries' warnings and log lines are shown only with --verbose or
    LAYERPRUNE_DEBUG=1 (their errors still reach the user, as our one-line errors)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers configures its logger
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"layerprune {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the libraries' warnings and logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Measure which transformer layers are redundant, remove them, heal and evaluate."""
    if verbose:
        os.environ["LAYERPRUNE_VERBOSE"] = "1"


def _split(text: str, kind: type, name: str) -> tuple:
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise LayerpruneError(f"--{name}: cannot read {text!r} as a comma-separated list of {kind.__name__}") from err


def config_options(cls: type, prefix: str = "", name: str = "config") -> Callable[[Callable[..., Any]], Any]:
    """Add one option per setting of `cls` (nested configs included), gathered into the `name`
    argument as a built `cls`. `prefix` names them --heal-... where they sit beside options of
    the same name (as in `prune --heal`)."""
    fields = list(flat_fields(cls, prefix))

    def option(field: Any) -> inspect.Parameter:
        flag = f"--{field.flag}"
        annotation, default = field.annotation, field.default
        if annotation in (bool, bool | None):  # --x/--no-x; None: neither given
            bare = field.flag.removeprefix(field.prefix.replace("_", "-"))
            flag = f"{flag}/--{field.prefix.replace('_', '-')}no-{bare}"
        elif typing.get_origin(annotation) is tuple:  # a list setting: comma-separated on the command line
            annotation, default = str | None, ",".join(map(str, default)) or None
        elif str in typing.get_args(annotation) and set(typing.get_args(annotation)) - {str, type(None)}:
            annotation, default = str, str(default)  # a number or a word (--batch-size 8 or auto)
        help_text = field.help + (f" One of: {', '.join(field.choices)}." if field.choices else "")
        help_text = rich.markup.escape(help_text)  # rich would eat `[vllm]` in `pip install 'layerprune[vllm]'`
        names = [flag, *(f"--{alias}" for alias in field.aliases)]
        return inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[annotation, typer.Option(*names, help=help_text)],
        )

    def parse(field: Any, value: Any) -> Any:
        if typing.get_origin(field.annotation) is tuple and isinstance(value, str):
            return _split(value, typing.get_args(field.annotation)[0], field.flag)
        return () if typing.get_origin(field.annotation) is tuple and value is None else value

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {f.name.removeprefix(prefix): parse(f, kwargs.pop(f.name)) for f in fields}
            return command(*args, **{name: build(cls, values)}, **kwargs)

        resolved = typing.get_type_hints(command, include_extras=True)  # this module's annotations are strings
        own = [
            p.replace(annotation=resolved[p.name]) for p in inspect.signature(run).parameters.values() if p.name != name
        ]
        params = own + [option(f) for f in fields]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def command(**configs: type | tuple[type, str]) -> Callable[[Callable[..., Any]], Any]:
    """Register a command: behind the error boundary, with one option group per config, each
    given to the command under its keyword (a config with a prefix: `heal_config=(HealConfig, "heal_")`)."""

    def register(function: Callable[..., Any]) -> Any:
        for name, spec in reversed(configs.items()):
            cls, prefix = spec if isinstance(spec, tuple) else (spec, "")
            function = config_options(cls, prefix, name)(function)
        return app.command()(user_errors(function))

    return register


@command()
def models() -> None:
    """List the built-in models and where their converted checkpoints are cached."""
    for name, builtin in BUILTIN_MODELS.items():
        path = builtin_cache_path(name)
        state = str(path) if (path / "config.json").is_file() else f"not converted yet (will be {path})"
        typer.echo(f"{name:14} {builtin.description}\n{'':14} package: {builtin.packages}\n{'':14} cache: {state}")


@command()
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="Remove the entries named, or every entry.")] = False,
    names: Annotated[list[str] | None, typer.Argument(help="Entries to remove with --clear (default: all).")] = None,
) -> None:
    """List the cache (converted GGUF and built-in models) with sizes, or clear it."""
    if names and not clear:
        raise LayerpruneError("name cache entries only with --clear; `layerprune cache` lists them")
    if clear:
        removed = clear_cache(names)
        typer.echo(f"removed {len(removed)} entries, {sum(e.size for e in removed) / 2**20:.1f} MiB")
        return
    entries = cache_entries()
    for entry in entries:
        typer.echo(f"{entry.size / 2**20:10.1f} MiB  {entry.name}")
    typer.echo(f"{sum(e.size for e in entries) / 2**20:10.1f} MiB  in all, in {cache_dir()}")


@command()
def strategies() -> None:
    """List the pruning strategies: what each removes, what it needs, and what it costs."""
    for name, strategy in STRATEGIES.items():
        needs = ", ".join(sorted(strategy.needs)) or "nothing"
        typer.echo(f"{name:15} {strategy.help}\n{'':15} needs: {needs}; cost: {strategy.cost}")


@command(placement=Placement, calibration=Calibration)
def analyze(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="New folder for distances.json, distances.csv, heatmap.png.")],
    overwrite: OverwriteOpt = False,
    offload: Annotated[
        bool | None,
        typer.Option("--offload/--no-offload", help="One layer in memory at a time (default: when needed)."),
    ] = None,
    memory_budget: Annotated[
        float | None, typer.Option("--memory-budget", help="With --offload: MiB for weights and states.")
    ] = None,
    calibration: Calibration | None = None,
    placement: Placement | None = None,
) -> None:
    """Angular distance d(l, n) for every block and Block Influence for every layer, in one pass."""
    result = run_analysis(
        model,
        calibration,
        out=out,
        overwrite=overwrite,
        offload=offload,
        memory_budget_mb=memory_budget,
        placement=placement,
    )
    where = f"{result.extra['device']}, {result.extra['dtype']}" + (
        ", one layer at a time" if result.extra["offload"] else ""
    )
    typer.echo(f"{result.num_layers} layers, {result.samples} samples of {result.data} ({where})")
    typer.echo("n    best block   angular distance")
    for n, start in result.best.items():
        typer.echo(f"{n:<4} {start:>3}..{start + n - 1:<6}  {result.angular[n][start]:.4f}")
    typer.echo(f"wrote {out}/distances.json, distances.csv, heatmap.png")


FormatOpt = Annotated[
    str | None, typer.Option("--format", help="folder (Hugging Face) or gguf (default: gguf for a .gguf --out).")
]
OuttypeOpt = Annotated[
    str,
    typer.Option(
        "--outtype",
        help="GGUF weights when llama.cpp's converter writes them: f16, bf16, q8_0, f32; or, with "
        "llama-cpp-python installed, quantized from f16 by llama.cpp: q4_k_m, q5_k_m, q6_k, q4_0, ...",
    ),
]


def _output(out: Path, form: str | None) -> tuple[Path, str]:
    """The output path and its format: `--format gguf` names a .gguf file."""
    if form not in (None, "folder", "gguf"):
        raise LayerpruneError(f"--format must be folder or gguf, got {form!r}")
    if out.name in ("", ".", ".."):
        raise LayerpruneError(
            f"--out {out} names a folder that exists already; give a new name such as {out / 'model'}"
        )
    if form == "gguf" and out.suffix.lower() != ".gguf":
        out = out.with_name(out.name + ".gguf")
    return out, output_format(out)


@command(heal_config=(HealConfig, "heal_"), config=PruneConfig)
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="New checkpoint folder, or .gguf file (must not exist).")],
    analysis: Annotated[
        Path | None, typer.Option("--analysis", help="distances.json from `analyze` (else computed).")
    ] = None,
    overwrite: OverwriteOpt = False,
    heal: Annotated[bool, typer.Option("--heal", help="Heal the pruned model (QLoRA) into --out.")] = False,
    save_adapter: SaveAdapterOpt = False,
    quantize: QuantizeOpt = None,
    form: FormatOpt = None,
    outtype: OuttypeOpt = "f16",
    config: PruneConfig | None = None,
    heal_config: HealConfig | None = None,
) -> None:
    """Remove layers and write a standard Hugging Face checkpoint, streaming tensors on disk; or a
    GGUF file (--out NAME.gguf): from a GGUF, still quantized, its tensors' bytes copied.

    With --heal, the pruned model is healed (see `layerprune heal`, options --heal-...) into --out.
    With --quantize, --out holds the result quantized (see `layerprune export`).
    """
    out, kind = _output(out, form)
    make: Callable[..., Any]
    if heal:
        make = partial(prune_and_heal, model, config=config, heal_config=heal_config, save_adapter=save_adapter)
    else:
        make = partial(run_prune, model, config=config, outtype=outtype)
    make = partial(make, analysis=analysis)
    if kind == "gguf" and quantize:
        raise LayerpruneError("--quantize writes a bitsandbytes folder; a GGUF output takes --outtype")
    if kind == "gguf" and heal:
        record = then_gguf(out, outtype, lambda staging: make(staging, overwrite=False), overwrite=overwrite).record
    else:
        record = _maybe_quantized(out, quantize, overwrite, make).record
    if not is_main_process():  # one process of a torchrun or accelerate launch reports
        return
    removed = record["removed_layers"]
    typer.echo(
        f"removed {len(removed)} of {record['num_layers_before']} layers ({record['strategy']}): {removed}\n"
        f"wrote {out} ({record['num_layers_after']} layers" + (f", {quantize})" if quantize else ")")
    )
    if heal:
        _echo_healing(record["healing"])


def _maybe_quantized(out: Path, scheme: str | None, overwrite: bool, make: Callable[..., Any]) -> Any:
    """`make(out)`, or with a scheme, `make` into staging and its quantized form into `out`."""
    if scheme is None:
        return make(out, overwrite=overwrite)
    return then_quantize(out, scheme, lambda staging: make(staging, overwrite=False), overwrite=overwrite)


def _echo_healing(healing: dict[str, Any]) -> None:
    typer.echo(
        f"healed ({healing['method']}, {healing['config']['steps']} steps): validation loss "
        f"{healing['validation_loss_before']:.3f} -> {healing['validation_loss_after']:.3f}, "
        f"{healing['tokens_per_second']:.0f} tokens/s, {healing['seconds']:.0f} s"
    )


@command(config=HealConfig)
def heal(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Healed checkpoint folder (must not exist).")],
    save_adapter: SaveAdapterOpt = False,
    overwrite: OverwriteOpt = False,
    quantize: QuantizeOpt = None,
    config: HealConfig | None = None,
) -> None:
    """Heal a (pruned) model with QLoRA, then merge into its unquantized weights.

    Run again after an interruption, it resumes from the last checkpoint. For several GPUs:
    accelerate launch -m layerprune heal MODEL --out DIR ...
    With --quantize, --out holds the merged model quantized (see `layerprune export`).
    """
    make = partial(run_heal, model, config=config, save_adapter=save_adapter)
    written = _maybe_quantized(out, quantize, overwrite, make)
    if not is_main_process():  # one process of a torchrun or accelerate launch reports
        return
    _echo_healing(written.record["healing"])
    typer.echo(f"wrote {written.path}" + (f" ({quantize})" if quantize else ""))


@command(config=EvalConfig)
def evaluate(
    model: ModelArg,
    out: Annotated[Path | None, typer.Option("--out", "--output-path", help="Write results.json here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a results file layerprune wrote.")] = False,
    config: EvalConfig | None = None,
) -> None:
    """QA accuracy through lm-eval-harness (offline data), held-out loss, and KL divergence (kld)."""
    record = run_evaluation(model, config=config, out=out, overwrite=overwrite)
    if not is_main_process():  # lm-eval gathers the results on the main process, which reports
        return
    typer.echo(f"{'task':14} {'n':>6} {'acc':>14} {'acc_norm':>14} {'chance':>7}")
    for name, metrics in record["tasks"].items():
        task = task_of(name)
        against = f" (against {record['reference']})" if task.reference else ""
        typer.echo(f"{name:14} {metrics['n']:>6} {task.describe(metrics)}{against}")
    typer.echo(f"{record['seconds']:.0f} s" + (f"; wrote {out}" if out else ""))


@command(config=SweepConfig)
def sweep(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Sweep folder (resumed if it exists).")],
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard", help="i/k: compute only every k-th point from the i-th (default under torchrun: rank)."
        ),
    ] = None,
    config: SweepConfig | None = None,
) -> None:
    """The paper's experiment: prune by each strategy at each fraction, heal, evaluate, report."""
    assert config is not None
    done = run_sweep(model, out, config, shard=Shard.parse(shard) if shard else None)
    if done.complete:
        for line in answers(out, config.verdicts):
            typer.echo(line)
        typer.echo(f"wrote {out}/results.csv, results.json and {out / 'report.html'}")
    else:
        typer.echo(f"wrote this shard's points to {out}/points; the last shard to finish writes the report")


@command(verdicts=Tolerance)
def report(
    folder: Annotated[Path, typer.Argument(help="A sweep folder.")],
    verdicts: Tolerance | None = None,
) -> None:
    """Rebuild report.html from a sweep's stored results (no model is run)."""
    if (folder / "points").is_dir():  # a published folder keeps only results.json
        collect(folder)
    written = write_report(folder, verdicts)
    for line in answers(folder, verdicts):
        typer.echo(line)
    typer.echo(f"wrote {written}")


@command(config=EvalConfig)
def sensitivity(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for sensitivity.json and sensitivity.png.")],
    overwrite: OverwriteOpt = False,
    config: EvalConfig | None = None,
) -> None:
    """Where knowledge sits: remove each single layer in turn; the paired change in each task."""
    assert config is not None
    result = run_sensitivity(model, out, config, overwrite=overwrite)
    if not is_main_process():
        return
    for task, measured in result.tasks.items():
        worst = sorted(measured["layers"], key=lambda layer: -layer["harm"])[:3]
        listed = ", ".join("{} ({:+.1%}, 95% CI {:+.1%} to {:+.1%})".format(w["layer"], w["harm"], *w["harm_interval"])
                           for w in worst)  # fmt: skip
        typer.echo(f"{task:14} {measured['documents']:>5} documents; most harmful to remove: {listed}")
    typer.echo(f"{result.forward_passes:.1f} forward passes, {result.seconds:.0f} s; wrote {out}")


@command(placement=Placement, settings=InferenceSettings)
def bench(
    models: Annotated[list[str], typer.Argument(help="Models to compare (folders, .gguf, built-in names).")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for bench.json and bench.png.")] = None,
    overwrite: OverwriteOpt = False,
    settings: InferenceSettings | None = None,
    placement: Placement | None = None,
) -> None:
    """Inference cost side by side: parameters, size, peak memory, prefill, decode, time to first token."""
    assert settings is not None
    results = benchmark(models, settings, placement, out=out, overwrite=overwrite)
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
    typer.echo(
        f"medians of {settings.repeats} repeats; prompt {settings.prompt_tokens} tokens, "
        f"{settings.new_tokens} new, batch {settings.batch_size}; on {results[0]['device']}, {results[0]['dtype']}"
    )
    for r in results:
        if r["run_bytes"] != r["disk_bytes"]:
            name = Path(r["model"]).name or r["model"]
            typer.echo(
                f"{name} ran as its dequantized copy ({r['run_bytes'] / 2**20:.0f} MB, {r['dtype']}): {r['path']}"
            )
    if out:
        typer.echo(f"wrote {out}/bench.json and bench.png")


@command(placement=Placement)
def export(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Quantized checkpoint folder, or .gguf file (must not exist).")],
    quantize: Annotated[str | None, typer.Option("--quantize", help="nf4 or int8 (bitsandbytes; default nf4).")] = None,
    form: FormatOpt = None,
    outtype: OuttypeOpt = "f16",
    overwrite: OverwriteOpt = False,
    placement: Placement | None = None,
) -> None:
    """Write a quantized checkpoint (bitsandbytes NF4 or int8) that transformers loads directly, or
    a GGUF file for llama.cpp and Ollama (--format gguf, through llama.cpp's converter)."""
    out, kind = _output(out, form)
    if kind == "gguf":
        if quantize:
            raise LayerpruneError("--quantize writes a bitsandbytes folder; a GGUF output takes --outtype")
        typer.echo(f"wrote {export_gguf(model, out, outtype, overwrite=overwrite).path} ({outtype})")
        return
    quantize = quantize or "nf4"
    written = export_quantized(model, out, quantize, overwrite=overwrite, placement=placement)
    typer.echo(f"wrote {written.path} ({quantize})")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so SIGTERM and SIGHUP clean up like Ctrl-C: no partial output


def reference() -> str:
    """The CLI reference in Markdown (docs/cli.md), generated from the commands, whose options
    come from the config dataclasses; `make docs` writes it and a test fails when it drifts."""
    group = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated by `make docs` from the commands and their config dataclasses (a test "
             "fails when this file drifts from them). `layerprune COMMAND -h` shows the same.", ""]  # fmt: skip
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        lines += [f"## `layerprune {name}`", "", " ".join((command.help or "").split()), ""]
        lines += ["| option | default | what it does |", "|---|---|---|"] if command.params else []
        for param in command.params:
            if param.param_type_name == "argument":
                names = param.name.upper()
            else:
                names = " / ".join([*param.opts, *param.secondary_opts])
            default = "required" if param.required else "" if param.default in (None, False, ()) else param.default
            cells = [f"`{names}`", str(default), " ".join(str(param.help or "").replace("\\[", "[").split())]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Entry point of the `layerprune` script."""

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    succeeded = False
    try:
        app(prog_name="layerprune")
    except SystemExit as done:  # typer ends every command this way
        succeeded = done.code in (0, None)
        raise
    finally:
        if end_processes(succeeded) and succeeded:
            # The work is done and written. Leave without the interpreter's teardown: there, gloo's
            # threads were seen (rarely) to abort a finished process with SIGABRT ("terminate called
            # without an active exception"). Offload folders this skips are reclaimed by the next run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    main()
