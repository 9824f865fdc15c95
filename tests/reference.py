"""Slow, obvious reference computations that the fast code is checked against."""

from __future__ import annotations

import math

import torch

from layerprune.architectures import find_architecture


def residual_states(model, batch) -> list[torch.Tensor]:
    """resid[0..L] from output_hidden_states, with the last (post-norm) entry replaced by the pre-norm state."""
    arch = find_architecture(model.config)
    captured = {}
    norm = model.get_submodule(arch.final_norm)
    handle = norm.register_forward_pre_hook(lambda module, args: captured.setdefault("pre_norm", args[0]))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=False)
    handle.remove()
    states = list(out.hidden_states)
    states[-1] = captured["pre_norm"]
    return [s.double() for s in states]


def direct_tables(model, batches) -> tuple[dict[int, list[float]], list[float]]:
    """The angular table and Block Influence computed directly, sample by sample and token by token."""
    per_sample: list[torch.Tensor] = []  # [L+1, H] final-token residuals
    cos_sums, tokens = None, 0
    for batch in batches:
        states = residual_states(model, batch)
        mask = batch["attention_mask"].bool()
        for row in range(mask.shape[0]):
            last = int(mask[row].nonzero().max())
            per_sample.append(torch.stack([s[row, last] for s in states]))
        cos = torch.stack(
            [
                torch.nn.functional.cosine_similarity(a, b, dim=-1)[mask].sum()
                for a, b in zip(states[:-1], states[1:], strict=True)
            ]
        )
        cos_sums = cos if cos_sums is None else cos_sums + cos
        tokens += int(mask.sum())
    num_layers = per_sample[0].shape[0] - 1
    angular = {}
    for n in range(1, num_layers):
        row = []
        for start in range(num_layers - n + 1):
            ds = [
                math.acos(
                    max(-1.0, min(1.0, float(torch.nn.functional.cosine_similarity(x[start], x[start + n], dim=0))))
                )
                / math.pi
                for x in per_sample
            ]
            row.append(sum(ds) / len(ds))
        angular[n] = row
    return angular, [float(v) for v in 1 - cos_sums / tokens]


def greedy(model, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, no KV cache."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def assert_same_tables(actual, expected, tolerance: float) -> None:
    """Two (angular table, Block Influence) pairs agree to `tolerance`, row by row."""
    import pytest

    (angular, block_influence), (expected_angular, expected_bi) = actual, expected
    assert sorted(angular) == sorted(expected_angular)
    for n, row in expected_angular.items():
        assert angular[n] == pytest.approx(row, abs=tolerance), n
    assert block_influence == pytest.approx(expected_bi, abs=tolerance)
