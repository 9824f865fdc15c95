"""How much calibration a linear repair needs, and which ridge suits a small calibration.

python bench/repair_calibration.py --model smollm2-135m --layers 11-18 --docs 8,16,32,64,128,256 \
    --ridges 1e-4,1e-3,1e-2,1e-1 --limit 100 --out /tmp/repair/calibration-smollm2-11-18.json

One pass of the full model over the largest calibration (CoQA, the analysis's default text, 256
tokens per document) sums the repair statistics of the block chunk by chunk, so the sums of the
first k documents, for every k asked, come from that one pass; the time each prefix's pass took is
recorded. For each k and each ridge share, the closed-form map is fitted, folded into a copy of the
model, the block is cut, and the LAMBADA loss is measured on the first `--limit` passages, paired
against the cut unrepaired on the same passages. Families whose MLP term passes through a norm
(Gemma 2/3, OLMo 2) are fitted through it by gradient steps, as `prune --repair linear` fits them,
on every token of the first k documents (the repair itself keeps at most `repair.SAMPLE_TOKENS`);
the ridge only sets their starting point, so they get one row per k.

python bench/repair_calibration.py --model gemma3-270m --layers 13-16 --docs 8,16,32,64,128,256 \
    --limit 100 --out /tmp/repair/calibration-gemma3-13-16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def losses(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    from layerprune.evaluation.harness import document_losses
    from layerprune.evaluation.uncertainty import Documents

    rows = document_losses(model, tokenizer, texts, 256, 8)
    return Documents(tuple(map(str, range(len(rows)))), tuple(r[0] for r in rows), tuple(float(r[1]) for r in rows))


@dataclass
class Case:
    """One model and one removed block, scored on the first LAMBADA passages: the unpruned model,
    and the losses of the cut unrepaired and of the full model on them."""

    name: str
    model: Any
    tokenizer: Any
    removed: list[int]
    texts: list[str]
    unrepaired: Any
    full: Any

    @classmethod
    def load(cls, name: str, layers: str, limit: int) -> Case:
        from layerprune.cut.surgery import prune_model
        from layerprune.evaluation.harness import text_documents
        from layerprune.runtime.models import load_model, resolve_model

        first, last = map(int, layers.split("-"))
        model, tokenizer = load_model(resolve_model(name))
        _, texts = text_documents("lambada", limit)
        cut = prune_model(copy.deepcopy(model), list(range(first, last + 1)))
        return cls(name, model, tokenizer, list(range(first, last + 1)), texts, losses(cut, tokenizer, texts),
                   losses(model, tokenizer, texts))  # fmt: skip

    @property
    def block(self) -> tuple[int, int]:
        return self.removed[0], self.removed[-1] + 1

    @property
    def arch(self) -> Any:
        from layerprune.architectures import find_architecture

        return find_architecture(self.model.config)

    def sums(self, batches: list[dict], sizes: list[int], keep: int = 0) -> dict[int, tuple[Any, float]]:
        """The block's statistics over the first k documents, for every k in `sizes`, from one pass,
        each with the seconds the pass took up to there."""
        from layerprune.healing import repair

        snapshots, parts, seconds, seen = {}, [], 0.0, 0
        for batch in batches:
            started = time.perf_counter()
            parts += repair.collect(self.model, [batch], [self.block], keep_samples=keep, progress=False)
            seconds += time.perf_counter() - started
            seen += len(batch["input_ids"])
            if seen in sizes:
                snapshots[seen] = (repair.pooled(parts, keep), seconds)
        return snapshots

    def score(self, result: Any) -> dict[str, Any]:
        """The LAMBADA loss with `result` (a repair.Fit) folded into a copy of the model and the block
        cut, paired against the cut unrepaired, and the share of the added loss it recovers."""
        import torch

        from layerprune.cut.surgery import prune_model
        from layerprune.evaluation.uncertainty import compare
        from layerprune.healing import repair

        repaired = copy.deepcopy(self.model)
        repair.fold(repaired, self.arch, self.block[0] - 1, result)
        prune_model(repaired, self.removed)
        with torch.inference_mode():
            scored = losses(repaired, self.tokenizer, self.texts)
        change = compare(self.unrepaired, scored, higher_is_better=False)
        lost = self.unrepaired.estimate() - self.full.estimate()
        return {"loss": round(scored.estimate(), 4), "change": round(change.change, 4),
                "interval": [round(v, 4) for v in change.change_interval],
                "recovered": round((self.unrepaired.estimate() - scored.estimate()) / lost, 3)}  # fmt: skip

    def save(self, out: str, rows: list[dict[str, Any]]) -> None:
        record = {"model": self.name, "layers": self.removed, "full_loss": self.full.estimate(),
                  "cut_loss": self.unrepaired.estimate(), "passages": len(self.texts), "rows": rows}  # fmt: skip
        Path(out).write_text(json.dumps(record, indent=1))


def case_arguments(description: str | None, docs: str, ridges: str) -> argparse.ArgumentParser:
    """The options of a bench on one `Case`: the model and block, the calibration sizes and ridge
    shares, the passages and the output file."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="11-18", help="the removed block, first-last")
    parser.add_argument("--docs", default=docs, help="calibration sizes, in documents")
    parser.add_argument("--ridges", default=ridges, help="ridge shares")
    parser.add_argument("--limit", type=int, default=100, help="LAMBADA passages")
    parser.add_argument("--out", required=True)
    return parser


def main() -> None:
    from layerprune.data import Calibration
    from layerprune.healing import repair

    args = case_arguments(__doc__, "8,16,32,64,128,256", "1e-4,1e-3,1e-2,1e-1").parse_args()
    case = Case.load(args.model, args.layers, args.limit)
    sizes, ridges = sorted(int(k) for k in args.docs.split(",")), [float(r) for r in args.ridges.split(",")]
    through = repair.through_norm(case.arch)
    if through:
        ridges = [repair.RIDGE]
    batches = Calibration(samples=sizes[-1]).batches(case.tokenizer)

    snapshots = case.sums(batches, sizes, keep=10**9 if through else 0)  # through the norm: every token's rows
    rows = []
    for docs, (stats, pass_seconds) in sorted(snapshots.items()):
        for share in ridges:
            started = time.perf_counter()
            if through:
                norm = case.arch.layer_list(case.model)[case.block[0] - 1].get_submodule(case.arch.mlp_term)
                result = repair.fit_through_norm(stats, norm, cosine=False)
            else:
                result = repair.fit(stats, ridge=share)
            fit_seconds = time.perf_counter() - started
            row = {"docs": docs, "tokens": stats.tokens, "ridge": share, "fit_residual": round(result.residual, 4),
                   **case.score(result), "pass_seconds": round(pass_seconds, 1),
                   "fit_seconds": round(fit_seconds, 2)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    case.save(args.out, rows)


if __name__ == "__main__":
    main()
