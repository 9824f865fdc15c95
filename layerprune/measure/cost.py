"""What a piece of work cost: wall time by phase, and the model work done, counted as the tokens
that went through decoder layers and through the head (final norm and output projection). Layer
tokens over the full model's layer count are full-model passes of one token each, a measure that
compares across machines where seconds do not."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from layerprune.architectures import find_architecture
from layerprune.measure.residual import stream_modules, watching


@dataclass
class Ledger:
    """Seconds by phase, and tokens through layers and heads, added up over a piece of work."""

    seconds: dict[str, float] = field(default_factory=dict)
    layer_tokens: int = 0
    head_tokens: int = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to phase `name`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` to phase `name`."""
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 2)

    @contextmanager
    def counting(self, *models: Any) -> Iterator[None]:
        """Count the tokens each layer and each head of `models` (each once) processes in the block:
        padding included, as the compute is spent on it; a cut in place counts its kept layers only."""
        with ExitStack() as stack:
            for model in {id(m): m for m in models}.values():
                modules = stream_modules(model, find_architecture(model.config))
                stack.enter_context(watching(modules, self._counter(len(modules) - 1)))
            yield

    def _counter(self, head: int) -> Any:
        def count(position: int, resid: Any) -> None:
            tokens = resid.shape[:-1].numel()
            if position == head:
                self.head_tokens += tokens
            else:
                self.layer_tokens += tokens

        return count

    def merged(self, other: Ledger) -> Ledger:
        """This ledger and `other` added up."""
        seconds = dict(self.seconds)
        for name, value in other.seconds.items():
            seconds[name] = round(seconds.get(name, 0.0) + value, 2)
        return Ledger(seconds, self.layer_tokens + other.layer_tokens, self.head_tokens + other.head_tokens)

    def share(self, parts: int) -> Ledger:
        """One of `parts` equal shares of this ledger (work done for several at once)."""
        seconds = {name: round(value / parts, 2) for name, value in self.seconds.items()}
        return Ledger(seconds, round(self.layer_tokens / parts), round(self.head_tokens / parts))

    def record(self, full_layers: int) -> dict[str, Any]:
        """The ledger as stored: seconds by phase and in all, tokens, and full-model token passes."""
        return {
            "seconds": dict(self.seconds),
            "total_seconds": round(sum(self.seconds.values()), 1),
            "layer_tokens": self.layer_tokens,
            "head_tokens": self.head_tokens,
            "full_passes": round(self.layer_tokens / full_layers, 1),
        }
