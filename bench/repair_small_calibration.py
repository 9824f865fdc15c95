"""Three ways a closed-form repair might need less calibration, against the plain ridge fit.

python bench/repair_small_calibration.py --model smollm2-135m --layers 11-18 --docs 4,8,16 \
    --out /tmp/repair/small-calibration-smollm2-11-18.json

For each calibration size (the first k CoQA documents, 256 tokens each) and ridge share, the map
of one block is fitted four ways from the sums of `repair.collect`, folded, the block cut, and the
LAMBADA loss measured on the first `--limit` passages, paired against the cut unrepaired:

- `ridge`: `repair.fit`, the ridge pulling T toward 0 (what `prune --repair linear` does);
- `identity`: the ridge pulling T toward I (no repair) instead, T = (A^T A + lam I)^-1 (A^T R + lam I);
- `rank-r`: T = I + a rank-r change, the reduced-rank regression of the block's update X - H on A
  (the ridge solution projected on the top r directions of its fitted values);
- `relative`: each token's rows weighted by 1 / ||X||, so the fit minimizes the stream's relative
  error, a closed-form stand-in for the cosine objective (a second pass with the weights).
"""

from __future__ import annotations

import json
from typing import Any

from repair_calibration import Case, case_arguments


def sums(case: Case, batches: list[dict], sizes: list[int], relative: bool) -> dict[int, Any]:
    """`Case.sums` without its times, each token's rows weighted by 1 / ||X|| when `relative`."""
    from layerprune.healing import repair

    plain_add = repair.BlockStatistics.add

    def weighted(self: Any, a: Any, h: Any, x: Any, keep: int, source: Any = None) -> None:
        w = 1 / x.norm(dim=-1, keepdim=True)
        plain_add(self, a * w, h * w, x * w, keep, source)

    repair.BlockStatistics.add = weighted if relative else plain_add
    try:
        return {docs: stats for docs, (stats, _) in case.sums(batches, sizes).items()}
    finally:
        repair.BlockStatistics.add = plain_add


def maps(stats: Any, share: float, ranks: list[int]) -> dict[str, Any]:
    """T by each closed-form variant (all but `relative`, which differs in its sums)."""
    import torch

    from layerprune.healing import repair

    eye = torch.eye(stats.aa.shape[0], dtype=torch.float64)
    lam = share * float(torch.diagonal(stats.aa).sum()) / stats.aa.shape[0]
    found = {"ridge": repair.fit(stats, ridge=share).map}
    found["identity"] = torch.linalg.solve(stats.aa + lam * eye, stats.ar + lam * eye)
    change = torch.linalg.solve(stats.aa + lam * eye, stats.ar - stats.aa)  # regression of X - H on A
    _, directions = torch.linalg.eigh(change.T @ stats.aa @ change)
    for rank in ranks:
        top = directions[:, -rank:]
        found[f"rank-{rank}"] = eye + change @ top @ top.T
    return found


def main() -> None:
    from layerprune.data import Calibration
    from layerprune.healing import repair

    parser = case_arguments(__doc__, "4,8,16", "1e-3,1e-1")
    parser.add_argument("--ranks", default="8,32,128", help="ranks of the reduced-rank fits")
    args = parser.parse_args()
    case = Case.load(args.model, args.layers, args.limit)
    if repair.through_norm(case.arch):
        raise SystemExit("this bench compares closed-form maps; a family that fits through a norm has none")
    sizes, ranks = [int(k) for k in args.docs.split(",")], [int(r) for r in args.ranks.split(",")]
    batches = Calibration(samples=max(sizes), batch_size=4).batches(case.tokenizer)
    plain, relative = (sums(case, batches, sizes, weighted) for weighted in (False, True))

    rows = []
    for docs in sizes:
        for share in (float(r) for r in args.ridges.split(",")):
            found = maps(plain[docs], share, ranks) | {"relative": repair.fit(relative[docs], ridge=share).map}
            for variant, t in found.items():
                fit = repair.Fit(*case.block, t, 0.0, plain[docs].tokens)
                row = {"docs": docs, "tokens": plain[docs].tokens, "ridge": share, "variant": variant}
                row |= case.score(fit)
                rows.append(row)
                print(json.dumps(row), flush=True)
    case.save(args.out, rows)


if __name__ == "__main__":
    main()
