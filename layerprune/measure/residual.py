"""The residual stream: watching it, running a range of layers from a recorded state, and the
reductions that layer pruning measures on it.

resid[l] is the residual stream entering layer l: resid[0] is the embeddings and resid[L] the
last layer's output before the final norm (what `output_hidden_states` does NOT give: its last
entry is after the norm). Forward pre-hooks on every layer and on the final norm see
resid[0..L] go by in one pass.

Gromov et al. 2024 (arXiv:2403.17887) measure d(l, n) = arccos(cos(resid[l], resid[l+n])) / pi
at each sample's final token; ShortGPT's Block Influence (Men et al. 2024, arXiv:2403.03853) is
BI[l] = 1 - E_tokens cos(resid[l], resid[l+1]). `AngularSums` accumulates both: cosines in fp32
whatever the model's dtype, sums in float64 on one device, wherever the states come from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from layerprune.architectures import Architecture


def hidden_state(args: tuple, kwargs: dict) -> Any:
    """The residual stream a layer (or the final norm) is called with."""
    return args[0] if args else kwargs["hidden_states"]


def stream_modules(model: Any, arch: Architecture, keep: Sequence[int] | None = None) -> list[Any]:
    """The modules entered by resid[0..L]: every layer (or those in `keep`), then the final norm."""
    layers = arch.layer_list(model)
    chosen = list(layers) if keep is None else [layers[i] for i in keep]
    return [*chosen, model.get_submodule(arch.final_norm)]


@contextmanager
def watching(modules: Sequence[Any], on_state: Callable[[int, Any], None]) -> Iterator[None]:
    """Call `on_state(position, resid)` as each module is entered (forward pre-hooks)."""

    def hook(position: int) -> Callable[..., None]:
        def call(module: Any, args: tuple, kwargs: dict) -> None:  # returns None: the inputs stay as they are
            on_state(position, hidden_state(args, kwargs).detach())

        return call

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_token_index(mask: Any) -> Any:
    """The position of each row's final real token, whatever the padding side."""
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)


def final_rows(resid: Any, last_index: Any) -> Any:
    """resid at each row's final real token: [B, H]."""
    import torch

    return resid[torch.arange(resid.shape[0], device=resid.device), last_index.to(resid.device)]


class AngularSums:
    """Running sums behind the angular table and Block Influence, on the device of the first state."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.angular_sum: Any = None  # [L+1, L+1] sum over samples of d(i, j)
        self.cos_sum: Any = None  # [L] sum over real tokens of cos(resid[l], resid[l+1])
        self.samples = 0
        self.tokens = 0

    def _allocate(self, device: Any) -> None:
        import torch

        if self.angular_sum is None:
            size = self.num_layers + 1
            self.angular_sum = torch.zeros(size, size, dtype=torch.float64, device=device)
            self.cos_sum = torch.zeros(self.num_layers, dtype=torch.float64, device=device)

    def add_neighbours(self, layer: int, before: Any, after: Any, mask: Any) -> None:
        """Block Influence's cosines between resid[layer] and resid[layer+1] over real tokens."""
        import torch

        self._allocate(before.device)
        cos = torch.nn.functional.cosine_similarity(before.float(), after.to(before.device).float(), dim=-1)
        self.cos_sum[layer] += cos[mask.to(cos.device)].double().sum().to(self.cos_sum.device)

    def add_samples(self, rows: Sequence[Any], tokens: int) -> None:
        """The final-token rows of resid[0..L] of a batch ([B, H] each) and its count of real tokens."""
        import torch

        self._allocate(rows[0].device)
        device = self.angular_sum.device
        unit = torch.nn.functional.normalize(torch.stack([r.to(device, torch.float64) for r in rows], dim=1), dim=-1)
        cos = (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)  # [B, L+1, L+1]
        self.angular_sum += (torch.arccos(cos) / math.pi).sum(dim=0)
        self.samples += unit.shape[0]
        self.tokens += tokens

    def result(self) -> tuple[dict[int, list[float]], list[float]]:
        """(n -> [d(l, n) for l in 0..L-n] for n in 1..L-1, BI per layer), averaged."""
        mean = (self.angular_sum / self.samples).cpu()
        angular = {
            n: [float(mean[start, start + n]) for start in range(self.num_layers - n + 1)]
            for n in range(1, self.num_layers)
        }
        block_influence = [float(v) for v in 1.0 - self.cos_sum.cpu() / self.tokens]
        return angular, block_influence


def slice_config(config: Any, keep: Sequence[int], arch: Architecture) -> None:
    """Set the layer count and slice every per-layer list (declared, or of length L) to `keep`,
    in a config object or a config.json dict."""
    num_layers = arch.num_layers(config)
    items = config if isinstance(config, dict) else config.to_dict()
    lists = set(arch.per_layer_config_lists)
    lists |= {k for k, v in items.items() if isinstance(v, list) and len(v) == num_layers}
    update: dict[str, Any] = {key: [items[key][i] for i in keep] for key in sorted(lists) if items.get(key) is not None}
    update[arch.num_layers_key] = len(keep)
    for key, value in update.items():
        if isinstance(config, dict):
            config[key] = value
        else:
            setattr(config, key, value)


@contextmanager
def layers_swapped(model: Any, arch: Architecture, keep: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the layers `keep`, its config sliced to match
    (models index per-layer lists such as `layer_types` by position; no cache, so layer_idx
    does not matter)."""
    import torch

    original = arch.layer_list(model)
    saved = {k: v for k, v in vars(model.config).items() if isinstance(v, list) or k == arch.num_layers_key}
    arch.set_layer_list(model, torch.nn.ModuleList([original[i] for i in keep]))
    slice_config(model.config, list(keep), arch)
    try:
        yield
    finally:
        arch.set_layer_list(model, original)
        for key, value in saved.items():
            setattr(model.config, key, value)


@contextmanager
def running_from(model: Any, arch: Architecture, keep: Sequence[int], start: Any = None) -> Iterator[None]:
    """Run only layers `keep`, the first of them fed `start` as its residual stream (the final
    norm when `keep` is empty; the embeddings as usual when `start` is None)."""
    first = stream_modules(model, arch, keep[:1])[0]

    def feed(module: Any, args: tuple, kwargs: dict) -> Any:
        fed = start.to(hidden_state(args, kwargs).device)  # a dispatched model moves states layer by layer
        return ((fed, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": fed})

    handle = first.register_forward_pre_hook(feed, with_kwargs=True) if start is not None else None
    try:
        with layers_swapped(model, arch, keep):
            yield
    finally:
        if handle is not None:
            handle.remove()


def run_layers(model: Any, arch: Architecture, batch: dict, start: Any, keep: Sequence[int]) -> Any:
    """resid entering the final norm after running only layers `keep` from `start` (the
    embeddings when `start` is None)."""
    import torch

    captured: list[Any] = []
    norm = stream_modules(model, arch, [])
    with (
        torch.inference_mode(),
        watching(norm, lambda _, resid: captured.append(resid)),
        running_from(model, arch, keep, start),
    ):
        model.base_model(**batch, use_cache=False)
    return captured[0]


def next_token_losses(logits: Any, batch: dict) -> tuple[Any, Any]:
    """The next-token cross-entropy at every position ([B, T-1], fp32) and which of them predict a
    real token (a bool mask of the same shape)."""
    import torch

    targets = batch["input_ids"][:, 1:].to(logits.device)
    mask = batch["attention_mask"][:, 1:].to(logits.device).bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return losses, mask
