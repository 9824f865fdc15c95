"""layerprune: measure which transformer layers are redundant, remove them, heal and evaluate.

Public API (the CLI is a thin layer over these; each takes its settings as a config object or
as that config's fields by keyword):
    analyze(model, ...)            -> AnalysisResult  angular distances and Block Influence
    prune(model, out, ...)         -> PruneResult     pruned Hugging Face checkpoint on disk
    prune_and_heal(model, out, ..) -> HealResult      the same, healed
    heal(model, out, ...)          -> HealResult      (Q)LoRA healing, merged
    prune_model(model, layers)     -> model           the same surgery on a loaded model
    repair_model(model, batches, layers, method) -> list[Fit]  fit and fold a training-free repair
                                                      into a loaded model (then prune_model it);
                                                      prune(..., repair="linear") does both on disk
    select_layers(num_layers, ...) -> list[int]       a strategy's choice, without a model
    evaluate(model, tasks, ...)    -> dict            lm-eval QA accuracy, held-out loss, KL from a reference
    sensitivity(model, tok, cfg)   -> SensitivityResult  each single layer's effect on each task
    run_sweep(model, out, config)  -> SweepResult     the paper's experiment, with a report
    resolve_model(spec)            -> Path            a local checkpoint folder for any model argument
"""

from layerprune._version import __version__
from layerprune.cut.surgery import prune_model
from layerprune.data import Calibration
from layerprune.errors import LayerpruneError
from layerprune.evaluation.harness import EvalConfig, evaluate
from layerprune.healing.lora import HealConfig, HealResult, heal
from layerprune.healing.repair import repair_model
from layerprune.measure.analysis import AnalysisResult, analyze
from layerprune.recipes.pipeline import PruneConfig, PruneResult, prune, prune_and_heal
from layerprune.recipes.sensitivity import SensitivityResult, sensitivity
from layerprune.runtime.models import load_model, resolve_model
from layerprune.selection.strategies import STRATEGIES, select_layers
from layerprune.sweep.run import SweepConfig, run_sweep

__all__ = [
    "STRATEGIES",
    "AnalysisResult",
    "Calibration",
    "EvalConfig",
    "HealConfig",
    "HealResult",
    "LayerpruneError",
    "PruneConfig",
    "PruneResult",
    "SensitivityResult",
    "SweepConfig",
    "__version__",
    "analyze",
    "evaluate",
    "heal",
    "load_model",
    "prune",
    "prune_and_heal",
    "prune_model",
    "repair_model",
    "resolve_model",
    "run_sweep",
    "select_layers",
    "sensitivity",
]
