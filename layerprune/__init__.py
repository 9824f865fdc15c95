"""layerprune: measure which transformer layers are redundant, remove them, heal and evaluate.

Public API (the CLI is a thin layer over these):
    analyze(model, ...)        -> AnalysisResult   angular distances and Block Influence
    prune(model, out, ...)     -> Path             pruned Hugging Face checkpoint on disk
    prune_model(model, layers) -> model            the same surgery on a loaded model
    evaluate(model, tasks)     -> dict             lm-eval QA accuracy and held-out loss
    resolve_model(spec)        -> Path             a local checkpoint folder for any model argument
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerprune")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .analysis import AnalysisResult, analyze
from .errors import LayerpruneError
from .evaluation import evaluate
from .models import load_model, resolve_model
from .surgery import prune, prune_model, select_layers

__all__ = [
    "AnalysisResult",
    "LayerpruneError",
    "analyze",
    "evaluate",
    "load_model",
    "prune",
    "prune_model",
    "resolve_model",
    "select_layers",
]
