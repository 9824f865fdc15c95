"""The model card (`README.md`) of every checkpoint layerprune writes, in the Hugging Face format,
so the folder can be pushed to a hub as it is: front matter (`base_model`, `library_name`, the
license copied from the source's card, tags `layerprune` and `pruned`), then what was removed and
why, the repair, healing and quantization settings, and evaluation results where the record has
them. Everything comes from the checkpoint's `layerprune.json` record, which stays the full account.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"


def source_license(source: Path) -> str | None:
    """The `license:` of a checkpoint's own model card, if it has one."""
    card = source / CARD_NAME
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    front = re.match(r"---\n(.*?)\n---", text, re.DOTALL)
    found = re.search(r"^license:\s*(\S+)\s*$", front.group(1), re.MULTILINE) if front else None
    return found.group(1).strip("'\"") if found else None


def _layers(layers: list[int]) -> str:
    """3, 5, 7-9: runs of consecutive layers written as ranges."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)


def _hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def model_card(record: dict[str, Any]) -> str:
    """The card's text for a checkpoint whose record is `record`."""
    source = str(record.get("source", ""))
    base = record.get("base_model") or (source if _hub_id(source) else None)
    license_ = record.get("license") or source_license(Path(record.get("source_path") or "/nonexistent"))
    front = ["---"] + ([f"base_model: {base}"] if base else []) + ["library_name: transformers"]
    front += ([f"license: {license_}"] if license_ else []) + ["tags:", "- layerprune", "- pruned", "---", ""]
    lines = [f"# {Path(source).name or 'model'}, {'pruned' if 'removed_layers' in record else 'changed'} by layerprune",
             ""]  # fmt: skip
    if "removed_layers" in record:
        before, after = record.get("num_layers_before"), record.get("num_layers_after")
        removed, strategy = record["removed_layers"], record.get("strategy", "explicit")
        lines.append(f"- **Layers removed:** {len(removed)} of {before} ({_layers(removed)}), chosen by "
                     f"`{strategy}`; {after} layers remain.")  # fmt: skip
        distance = (record.get("selection") or {}).get("angular_distance_of_block")
        if distance is not None:
            lines.append(f"  The block's angular distance was {distance:.4f} (Gromov et al. 2024).")
    if record.get("repair"):
        repair = record["repair"]
        residuals = ", ".join(f"{b['fit_residual']:.3f}" for b in repair.get("blocks", []))
        lines.append(f"- **Repair:** `{repair['method']}`, a {repair.get('folded')}, fitted on "
                     f"{repair.get('tokens')} calibration tokens (fit residual per block: {residuals}).")  # fmt: skip
    if record.get("healing"):
        healing = record["healing"]
        config, schedule = healing.get("config", {}), healing.get("schedule", {})
        lines.append(f"- **Healing:** {healing.get('method')}, objective `{healing.get('objective')}`, "
                     f"{schedule.get('steps', config.get('steps'))} steps at peak learning rate "
                     f"{schedule.get('peak_lr', config.get('lr'))}; validation loss "
                     f"{_loss(healing.get('validation_loss_before'))} before, "
                     f"{_loss(healing.get('validation_loss_after'))} after.")  # fmt: skip
    if record.get("quantization"):
        lines.append(f"- **Quantization:** {record['quantization'].get('scheme')}.")
    evaluation = record.get("evaluation")
    lines.append(f"- **Evaluation:** {evaluation}" if evaluation else
                 "- **Evaluation:** none recorded; `layerprune evaluate` measures it against the source.")  # fmt: skip
    lines += ["", f"Made with layerprune {record.get('layerprune_version', '')} on {record.get('created', '')}. The "
              "full account of what was done is in `layerprune.json`.", ""]  # fmt: skip
    return "\n".join(front + lines)


def _loss(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("eval_loss", value.get("loss"))
    return f"{value:.3f}" if isinstance(value, (int, float)) else "not measured"
