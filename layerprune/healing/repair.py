"""Repair a cut without training: one linear map per removed block, fitted in one calibration pass
and folded into the kept weights, so the checkpoint keeps its family's architecture exactly.

After ReplaceMe (Shopkhoev et al., NeurIPS 2025, arXiv 2505.02819). For a block of layers s..e-1
removed after the kept layer p = s - 1, let

    H = resid[s]      the residual stream leaving layer p,
    A                 the MLP's term in it (what layer p's MLP adds: its output, or for Gemma 2/3
                      and OLMo 2 the output of the post-feed-forward norm it passes through),
    X = resid[e]      the stream the removed block would have produced.

The pruned model hands H = (H - A) + A to layer e. Repair hands it (H - A) + A T instead, with

    T = argmin_T ||A T - R||^2 + lam ||T||^2,   R = X - H + A   (so T = I is no repair)
      = (A^T A + lam I)^-1 A^T R,               lam = RIDGE * tr(A^T A) / d

A^T A, A^T R and ||R||^2 are summed over the calibration tokens in float64, batch by batch, so
memory is d x d whatever the number of tokens. `cosine` then refines T for COSINE_STEPS steps of
Adam to minimize the cosine distance between (H - A) + A T and X on up to SAMPLE_TOKENS tokens,
as ReplaceMe's second variant does. T is folded into the module that makes A: the down projection
(W <- T^T W, b <- b T).

Where A is a norm's output, A = norm(Y) with Y the down projection's (Gemma 2/3, OLMo 2), no map
on A can be folded. The map goes in before the norm instead: A' = norm_w'(Y M), with M folded into
the down projection and the norm's weight w' fitted with it, by NORM_STEPS steps of Adam on
batches of NORM_BATCH of the kept tokens (the least-squares objective for `linear`, the cosine one
for `cosine`), from M = I and the norm's weight times the best per-channel factor; its residual is
measured on those tokens. The loss-repair search scores such a block with this same fit.

The statistics come from one pass of the unpruned model (every block's from the same pass), so a
cut of several blocks is repaired block by block as if each were the only one. A model larger than
memory makes that pass one layer at a time (`collect_streaming`, through `streaming.LayerStream`);
then only the modules the maps fold into are loaded to fold them.
"""

from __future__ import annotations

import math
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from layerprune.architectures import Architecture, find_architecture
from layerprune.data import Calibration
from layerprune.errors import LayerpruneError
from layerprune.io.checkpoint import TORCH_DTYPES, TensorEntry, read_config, tensor_entries
from layerprune.measure.streaming import LayerStream
from layerprune.runtime.devices import Placement, layer_by_layer, plan_of, plan_placement
from layerprune.runtime.models import load_model, load_tokenizer

RIDGE = 1e-3  # share of the mean eigenvalue of A^T A: keeps the solve well posed, changes a well-fed fit little
COSINE_STEPS = 200
COSINE_LR = 1e-4
SAMPLE_TOKENS = 16384  # tokens kept for a fit by gradient steps (cosine, or through a norm)
# the fit through a norm: on Gemma 3's blocks, closer on held-out tokens than batches of 4,096 at
# 3e-3, in a quarter of the time (docs/results/repair.md)
NORM_STEPS = 300
NORM_LR = 1e-2
NORM_BATCH = 1024
METHODS = ("none", "linear", "cosine")


def removed_blocks(removed: list[int]) -> list[tuple[int, int]]:
    """The maximal runs of consecutive removed layers, as [start, end)."""
    blocks: list[list[int]] = []
    for layer in sorted(removed):
        if blocks and blocks[-1][1] == layer:
            blocks[-1][1] = layer + 1
        else:
            blocks.append([layer, layer + 1])
    return [(start, end) for start, end in blocks]


@dataclass
class BlockStatistics:
    """What one block's fit needs, summed over the calibration tokens (float64)."""

    start: int
    end: int
    aa: Any = None  # sum of A^T A: [d, d]
    ar: Any = None  # sum of A^T R: [d, d]
    rr: float = 0.0  # sum of ||R||^2
    tokens: int = 0
    # (H - A, S, X) rows kept for a fit by gradient steps; S is what the map takes: A, or the
    # norm's input Y where A is a norm's output
    samples: list[Any] = field(default_factory=list)

    def add(self, a: Any, h: Any, x: Any, keep_samples: int, source: Any = None) -> None:
        """Add the rows (real tokens only) of one batch; `source` is the norm's input where A is a norm's output."""
        import torch

        a64, r64 = a.double(), (x - h + a).double()
        if self.aa is None:
            d = a.shape[-1]
            self.aa = torch.zeros(d, d, dtype=torch.float64, device=a.device)
            self.ar = torch.zeros(d, d, dtype=torch.float64, device=a.device)
        self.aa += a64.T @ a64
        self.ar += a64.T @ r64
        self.rr += float((r64 * r64).sum())
        self.tokens += a.shape[0]
        room = keep_samples - sum(s[0].shape[0] for s in self.samples)
        if room > 0:
            kept = (h - a, a if source is None else source, x)
            self.samples.append(tuple(t[:room].float().cpu() for t in kept))


def pooled(parts: list[BlockStatistics], keep_samples: int) -> BlockStatistics:
    """One block's statistics over the tokens of all `parts` (the same block, other documents),
    with the parts' kept rows, in order, up to `keep_samples`."""
    total = BlockStatistics(parts[0].start, parts[0].end, sum(p.aa for p in parts), sum(p.ar for p in parts),
                            sum(p.rr for p in parts), sum(p.tokens for p in parts))  # fmt: skip
    for rows in (r for p in parts for r in p.samples):
        room = keep_samples - sum(s[0].shape[0] for s in total.samples)
        if room > 0:
            total.samples.append(tuple(t[:room] for t in rows))
    return total


class _Enough(Exception):
    """Raised by a hook to end a forward pass once every needed state is seen."""


def collect(model: Any, batches: list[dict], blocks: list[tuple[int, int]], keep_samples: int = 0,
            progress: bool = True) -> list[BlockStatistics]:  # fmt: skip
    """One pass of the unpruned `model` over `batches`, summing every block's statistics."""
    import torch
    from tqdm.auto import tqdm

    arch = find_architecture(model.config)
    num_layers = arch.num_layers(model.config)
    layers = arch.layer_list(model)
    stats = [BlockStatistics(start, end) for start, end in blocks]
    seen: dict[tuple[str, int], Any] = {}

    def entering(index: int) -> Any:  # the module whose input is resid[index]
        return layers[index] if index < num_layers else model.get_submodule(arch.final_norm)

    last = max(end for _, end in blocks)

    def pre_hook(index: int) -> Any:
        def call(module: Any, args: tuple, kwargs: dict) -> None:
            seen[("resid", index)] = (args[0] if args else kwargs["hidden_states"]).detach()
            if index == last:
                raise _Enough  # the layers after the last block's end (and the head) are not needed

        return call

    def term_hook(index: int) -> Any:
        def call(module: Any, args: tuple, output: Any) -> None:
            seen[("term", index)] = (output[0] if isinstance(output, tuple) else output).detach()
            seen[("source", index)] = args[0].detach() if through_norm(arch) else None

        return call

    handles = []
    for index in sorted({s for s, _ in blocks} | {e for _, e in blocks}):
        handles.append(entering(index).register_forward_pre_hook(pre_hook(index), with_kwargs=True))
    for start, _ in blocks:
        handles.append(layers[start - 1].get_submodule(arch.mlp_term).register_forward_hook(term_hook(start - 1)))
    device = model.get_input_embeddings().weight.device
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="repair statistics", unit="batch", disable=not progress):
                seen.clear()
                with suppress(_Enough):
                    model.base_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                real = batch["attention_mask"].bool().to(device)
                for block in stats:
                    term, leaving, target = (seen[key][real] for key in (("term", block.start - 1),
                                             ("resid", block.start), ("resid", block.end)))  # fmt: skip
                    source = seen[("source", block.start - 1)]
                    block.add(term, leaving, target, keep_samples, None if source is None else source[real])
    finally:
        for handle in handles:
            handle.remove()
    return stats


def collect_streaming(stream: LayerStream, batches: list[dict], blocks: list[tuple[int, int]], keep_samples: int = 0,
                      progress: bool = True) -> list[BlockStatistics]:  # fmt: skip
    """`collect` for a model larger than memory: the same sums from one pass of `stream`, one layer
    in memory at a time. Each block's MLP term and leaving stream (its real tokens' rows) are held
    on the device from the layer before the block to the block's last layer."""
    arch = stream.arch
    stats = [BlockStatistics(start, end) for start, end in blocks]
    term: list[tuple[Any, Any]] = []
    held: dict[tuple[int, int], tuple[Any, Any, Any]] = {}

    def store(_module: Any, args: tuple, out: Any) -> None:
        term.append(((out[0] if isinstance(out, tuple) else out).detach(), args[0].detach()))

    def watch(layer: int, module: Any) -> list[Any]:
        if all(block.start - 1 != layer for block in stats):
            return []
        return [module.get_submodule(arch.mlp_term).register_forward_hook(store)]

    def visit(layer: int, b: int, batch: dict, _previous: Any, resid: Any) -> None:
        real = batch["attention_mask"].bool()
        for i, block in enumerate(stats):
            if layer == block.start - 1:
                a, source = term[-1]
                held[(i, b)] = (a[real], resid[real], source[real] if through_norm(arch) else None)
            if layer == block.end - 1:
                a, h, source = held.pop((i, b))
                block.add(a, h, resid[real], keep_samples, source)
        term.clear()

    stream.run(batches, visit, last_layer=max(end for _, end in blocks) - 1, watch=watch,
               desc="repair statistics (offload)", progress=progress)  # fmt: skip
    return stats


def through_norm(arch: Architecture) -> bool:
    """Whether the MLP's term is a norm's output (Gemma 2/3, OLMo 2), so the map goes in before the norm."""
    return arch.repair_fold_kind == "norm"


@dataclass(frozen=True)
class Fit:
    """One block's map, and how well it fits: the residual ||A' - R||^2 over ||A - R||^2, A' the
    repaired term (A T, or norm_w'(Y M)); 1 is the cut unrepaired, below 1 is better than it."""

    start: int
    end: int
    map: Any  # [d, d]: T on A, or M on Y before the norm
    residual: float
    tokens: int
    norm_weight: Any = None  # the norm's fitted weight w', where the map goes in before a norm
    cosine_distance: float | None = None  # after a cosine fit, on its sample

    def record(self) -> dict[str, Any]:
        return {"block": [self.start, self.end - 1], "after_layer": self.start - 1,
                "through_norm": self.norm_weight is not None, "fit_residual": round(self.residual, 6),
                "tokens": self.tokens, "cosine_distance": self.cosine_distance}  # fmt: skip


def _ridge(stats: BlockStatistics, share: float = RIDGE) -> float:
    """The ridge term of one block's fit, `share` x tr(A^T A) / d; a one-line error for too few
    tokens to fit a d x d map, or an MLP output that is all zero."""
    import torch

    d = stats.aa.shape[0]
    if stats.tokens < d:
        raise LayerpruneError(
            f"repairing layers {stats.start}-{stats.end - 1} fits a {d} x {d} map: it needs at least {d} "
            f"calibration tokens, got {stats.tokens}; raise --samples or --seq-len"
        )
    lam = share * float(torch.diagonal(stats.aa).sum()) / d
    if not math.isfinite(lam) or lam <= 0:
        raise LayerpruneError(
            f"repairing layers {stats.start}-{stats.end - 1}: the MLP output is all zero; no map fits"
        )
    return lam


def fit(stats: BlockStatistics, ridge: float | None = None) -> Fit:
    """The ridge least-squares map T on A of one block (closed form); a one-line error for too few
    tokens or a singular fit."""
    import torch

    aa, ar, d = stats.aa, stats.ar, stats.aa.shape[0]
    lam = _ridge(stats, RIDGE if ridge is None else ridge)
    try:
        factor = torch.linalg.cholesky(aa + lam * torch.eye(d, dtype=aa.dtype, device=aa.device))
    except RuntimeError as err:
        raise LayerpruneError(f"repairing layers {stats.start}-{stats.end - 1}: the fit is singular ({err})") from err
    t = torch.cholesky_solve(ar, factor)
    return Fit(stats.start, stats.end, t, _residual(stats, t), stats.tokens)


def _residual(stats: BlockStatistics, t: Any) -> float:
    """||A T - R||^2 / ||A - R||^2, from the sums alone."""
    import torch

    def error(m: Any) -> float:
        return float(torch.sum(m * (stats.aa @ m)) - 2 * torch.sum(m * stats.ar) + stats.rr)

    identity = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return error(t) / max(error(identity), 1e-30)


def _fit_steps(steps: int, stats: BlockStatistics, progress: bool) -> Any:
    """The steps of a fit by gradient steps, with a bar (they take seconds to minutes on a CPU)."""
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=f"repair fit, layers {stats.start}-{stats.end - 1}", unit="step",
                disable=not progress)  # fmt: skip


def refine_cosine(stats: BlockStatistics, start: Fit, steps: int = COSINE_STEPS, progress: bool = False) -> Fit:
    """`start` refined by Adam to minimize the mean cosine distance between (H - A) + A T and X on
    the kept sample of tokens."""
    import torch

    y, a, x = (torch.cat([s[i] for s in stats.samples]) for i in range(3))
    t = start.map.float().cpu().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([t], lr=COSINE_LR)

    def distance() -> Any:
        return (1 - torch.nn.functional.cosine_similarity(y + a @ t, x, dim=-1)).mean()

    with torch.enable_grad():
        for _ in _fit_steps(steps, stats, progress):
            optimizer.zero_grad()
            loss = distance()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        final = float(distance())
    refined = t.detach().to(start.map)
    return replace(start, map=refined, residual=_residual(stats, refined.double()), cosine_distance=round(final, 6))


def fit_through_norm(stats: BlockStatistics, norm: Any, cosine: bool, progress: bool = False) -> Fit:
    """The map M before `norm` and the norm's weight w' that bring (H - A) + norm_w'(Y M) closest to
    X on the kept tokens (least squares, or the cosine distance for `cosine`): NORM_STEPS steps of
    Adam on seeded batches of NORM_BATCH tokens, on the device the statistics were summed on, from
    M = I and the norm's weight scaled by the best per-channel factor on A (closed form)."""
    import torch
    from torch.func import functional_call

    lam, device = _ridge(stats), stats.aa.device  # too few tokens, or no MLP output, is refused first
    rest, y, x = (torch.cat([s[i] for s in stats.samples]).to(device) for i in range(3))
    weight = norm.weight.detach().to(device=device, dtype=torch.float32)
    with torch.no_grad():  # each token's squared error unrepaired: the scale of the least-squares objective
        unrepaired = ((rest + functional_call(norm, {"weight": weight}, (y,)) - x) ** 2).sum(-1)
    d = y.shape[1]
    per_channel = torch.diagonal(stats.ar) / (torch.diagonal(stats.aa) + lam)
    m = torch.eye(d, device=device).requires_grad_(True)
    w = _scaled_weight(norm, weight, per_channel.float()).requires_grad_(True)
    optimizer = torch.optim.Adam([m, w], lr=NORM_LR)

    def objective(rows: Any, cosine: bool) -> Any:
        repaired = rest[rows] + functional_call(norm, {"weight": w}, (y[rows] @ m,))
        if cosine:
            return (1 - torch.nn.functional.cosine_similarity(repaired, x[rows], dim=-1)).mean()
        return ((repaired - x[rows]) ** 2).sum() / unrepaired[rows].sum()

    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in _fit_steps(NORM_STEPS, stats, progress):
            rows = torch.randint(0, y.shape[0], (min(NORM_BATCH, y.shape[0]),), generator=generator).to(device)
            optimizer.zero_grad()
            objective(rows, cosine).backward()
            optimizer.step()
    with torch.no_grad():
        every = torch.arange(y.shape[0], device=device)
        residual, distance = float(objective(every, False)), round(float(objective(every, True)), 6)
    return Fit(stats.start, stats.end, m.detach().double(), residual, stats.tokens, w.detach(),
               distance if cosine else None)  # fmt: skip


def _scaled_weight(norm: Any, weight: Any, factor: Any) -> Any:
    """The weight that scales the norm's output by `factor` per channel beyond what `weight` does:
    the norm multiplies by its weight (Llama's RMSNorm) or by 1 + weight (Gemma's), found by probing."""
    import torch
    from torch.func import functional_call

    probe = functional_call(norm, {"weight": torch.zeros_like(weight)}, (torch.ones_like(weight)[None],))
    offset = 1.0 if bool(probe.abs().sum() > 0) else 0.0
    return (offset + weight) * factor - offset


def folded(model: Any, arch: Architecture, layer: int, result: Fit) -> dict[str, Any]:
    """The parameters of layer `layer` that a map changes, with it folded in, by their path in the
    layer (`mlp.down_proj.weight`, ...): A becomes A T (or norm_w'(Y M)). The model is not changed."""
    import torch

    block = arch.layer_list(model)[layer]
    module = block.get_submodule(arch.repair_fold)
    t = result.map.to(device=module.weight.device, dtype=torch.float64)
    weight = module.weight.detach().double()
    new = weight @ t if arch.repair_fold_kind == "conv1d" else t.T @ weight  # conv1d: [in, out]
    changed = {f"{arch.repair_fold}.weight": new.to(module.weight.dtype)}
    if getattr(module, "bias", None) is not None:
        changed[f"{arch.repair_fold}.bias"] = (module.bias.detach().double() @ t).to(module.bias.dtype)
    if result.norm_weight is not None:
        norm = block.get_submodule(arch.mlp_term)
        changed[f"{arch.mlp_term}.weight"] = result.norm_weight.to(norm.weight)
    return changed


def fold(model: Any, arch: Architecture, layer: int, result: Fit) -> None:
    """Fold a map into layer `layer`'s weights, in place."""
    import torch

    block = arch.layer_list(model)[layer]
    with torch.no_grad():
        for path, value in folded(model, arch, layer, result).items():
            block.get_parameter(path).copy_(value)


def mapped_term(model: Any, arch: Architecture, result: Fit, term: Any, source: Any) -> Any:
    """The MLP term of the layer before a block once its map is folded in: A T, or norm_w'(Y M)
    from the norm's input Y (`source`) where A is a norm's output; in `term`'s dtype."""
    from torch.func import functional_call

    if result.norm_weight is None:
        return term @ result.map.to(term)
    norm = arch.layer_list(model)[result.start - 1].get_submodule(arch.mlp_term)
    weight = result.norm_weight.to(device=source.device, dtype=norm.weight.dtype)
    return functional_call(norm, {"weight": weight}, (source @ result.map.to(source),)).to(term.dtype)


def fold_modules(arch: Architecture) -> list[str]:
    """The modules of the layer before a block that a repair changes."""
    return [arch.repair_fold, *([arch.mlp_term] if through_norm(arch) else [])]


def _blocks(removed: list[int]) -> list[tuple[int, int]]:
    """The blocks of a cut that can be repaired, or a one-line error."""
    blocks = removed_blocks(removed)
    if blocks and blocks[0][0] == 0:
        raise LayerpruneError(
            "repair folds its map into the layer before the cut, and this cut starts at layer 0; remove other layers "
            "or prune without --repair"
        )
    return blocks


def _check_method(method: str) -> None:
    if method not in METHODS[1:]:
        raise LayerpruneError(f"--repair must be one of {', '.join(METHODS)}, got {method!r}")


def fit_all(stats: list[BlockStatistics], method: str, model: Any, arch: Architecture, progress: bool) -> list[Fit]:
    """Every block's map: the least-squares fit, refined for `cosine`; where the MLP's term is a
    norm's output, the fit through that norm."""
    fits = []
    for block in stats:
        if through_norm(arch):
            norm = arch.layer_list(model)[block.start - 1].get_submodule(arch.mlp_term)
            fits.append(fit_through_norm(block, norm, method == "cosine", progress))
        else:
            result = fit(block)
            fits.append(refine_cosine(block, result, progress=progress) if method == "cosine" else result)
    return fits


def _kept_tokens(method: str, arch: Architecture) -> int:
    """How many tokens' rows a fit by gradient steps keeps (none for the closed form alone)."""
    return SAMPLE_TOKENS if method == "cosine" or through_norm(arch) else 0


def repair_model(
    model: Any,
    batches: list[dict],
    removed: list[int],
    method: str = "linear",
    progress: bool = True,
) -> list[Fit]:
    """Fit a map for every block of `removed` on `batches` and fold it into the unpruned `model`,
    in place (prune it afterwards); returns the fits."""
    _check_method(method)
    arch = find_architecture(model.config)
    stats = collect(model, batches, _blocks(removed), keep_samples=_kept_tokens(method, arch), progress=progress)
    fits = fit_all(stats, method, model, arch, progress)
    for result in fits:
        fold(model, arch, result.start - 1, result)
    return fits


def repair_record(method: str, fits: list[Fit], arch: Architecture, calibration: dict[str, Any], seconds: float,
                  tokens: int) -> dict[str, Any]:  # fmt: skip
    """What the record says of a repair: what was fitted, on what data, how well, where it went."""
    folded = f"d x d map into {arch.repair_fold}"
    if through_norm(arch):
        folded += f" before {arch.mlp_term} (with that norm's weight; {NORM_STEPS} Adam steps)"
    return {
        "method": method,
        "folded": folded,
        "ridge": f"{RIDGE} x tr(A^T A) / d",
        "cosine_steps": COSINE_STEPS if method == "cosine" and not through_norm(arch) else None,
        "calibration": calibration,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "blocks": [f.record() for f in fits],
    }


def repaired_weights(
    src: Path,
    removed: list[int],
    method: str,
    calibration: Calibration,
    placement: Placement,
    progress: bool = True,
    offload: bool | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint `src` repaired for the cut `removed`: the folded tensors (by source key, of
    their stored dtype and shape, in memory: a module or two per block) and the record of the repair.
    `surgery.prune_checkpoint` then writes the pruned checkpoint with them.
    The statistics come from `loaded` (the unpruned model and its tokenizer, already in memory,
    left unchanged) or from `src` loaded here; `offload` collects them one layer at a time
    (`streaming`), by default when the model would not fit in the memory of its device."""
    import torch

    _check_method(method)
    _, arch = read_config(src)
    entries = tensor_entries(src)
    if not entries:
        raise LayerpruneError(f"--repair needs a safetensors checkpoint; {src} has none")
    blocks = _blocks(removed)
    keep = _kept_tokens(method, arch)
    started = time.perf_counter()
    if loaded is not None:
        model, tokenizer = loaded
        plan, offload = plan_of(model), False
    else:
        plan = plan_placement(placement, src)
        offload = layer_by_layer(plan, src, offload, str(src), f"repairing ({method})")
        if not offload:
            model, tokenizer = load_model(src, plan)
    if offload:
        stream = LayerStream(src, replace(plan, device_map=None, max_memory=None))
        stats = collect_streaming(stream, calibration.batches(load_tokenizer(src)), blocks, keep, progress)
        model = stream.model  # on the meta device but for the modules the maps fold into, loaded below
        for start, _ in blocks:
            keys = [k for k in stream.layer_keys(start - 1) if any(f".{m}." in f".{k}" for m in fold_modules(arch))]
            stream.place({name: t.float() for name, t in stream.read(keys).items()}, "cpu")
        plan = stream.plan
    else:
        stats = collect(model, calibration.batches(tokenizer), blocks, keep_samples=keep, progress=progress)
    fits = fit_all(stats, method, model, arch, progress)
    tensors = {}
    for result in fits:
        for path, value in folded(model, arch, result.start - 1, result).items():
            key = _checkpoint_key(arch, entries, result.start - 1, path)
            tensors[key] = value.to(getattr(torch, TORCH_DTYPES[entries[key].dtype])).cpu()
    del model
    seconds, tokens = time.perf_counter() - started, fits[0].tokens if fits else 0
    record = repair_record(method, fits, arch, asdict(calibration), seconds, tokens) | {
        "placement": plan.record(), "offload": offload}  # fmt: skip
    return tensors, record


def _checkpoint_key(arch: Architecture, entries: dict[str, TensorEntry], layer: int, rest: str) -> str:
    """The checkpoint's key of a tensor of layer `layer` (checkpoints may omit the base prefix)."""
    for key in entries:
        split = arch.split_layer_key(key)
        if split is not None and split[1] == layer and split[2] == rest:
            return key
    raise LayerpruneError(f"the checkpoint has no tensor {rest} in layer {layer} to fold the repair into")
