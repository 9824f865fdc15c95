"""Every checkpoint layerprune writes carries a Hugging Face model card made from its record."""

from __future__ import annotations

import yaml
from conftest import HEAL_TEXT, save_tiny, tiny_model

from layerprune.io.model_card import CARD_NAME, model_card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_pruned_repaired_and_healed_checkpoint_says_what_was_done(tmp_path):
    from layerprune import heal, prune
    from layerprune.healing.lora import HealConfig

    src = save_tiny(tiny_model("llama", seed=1), tmp_path / "model")
    (src / CARD_NAME).write_text("---\nlicense: mit\nlanguage: en\n---\n# The source model\nIts own words.\n")
    (tmp_path / "text.txt").write_text(HEAL_TEXT)
    pruned = prune(src, tmp_path / "pruned", layers=[2, 3], repair="linear", data=str(tmp_path / "text.txt"),
                   samples=24, seq_len=24, progress=False)  # fmt: skip
    card = (pruned.path / CARD_NAME).read_text()
    assert front_matter(card) == {"library_name": "transformers", "license": "mit", "tags": ["layerprune", "pruned"]}
    assert "Its own words" not in card, "the source's card, copied with the other files, is replaced"
    assert "**Layers removed:** 2 of 6 (2–3), chosen by `explicit`; 4 layers remain." in card
    fit = pruned.record["repair"]["blocks"][0]["fit_residual"]
    assert "**Repair:** `linear`, a d x d map into mlp.down_proj" in card and f"{fit:.3f}" in card
    config = HealConfig(steps=2, batch_size=2, grad_accum=1, seq_len=32, data=str(tmp_path / "text.txt"), quant=False)
    healed = heal(pruned.path, tmp_path / "healed", config)
    card = (healed.path / CARD_NAME).read_text()
    assert front_matter(card)["license"] == "mit" and "**Layers removed:** 2 of 6" in card
    after = healed.healing["validation_loss_after"]
    assert "**Healing:** LoRA, objective `lm`, 2 steps" in card and f"{after:.3f} after" in card


def test_a_hub_source_is_the_base_model_and_a_record_without_cut_is_not_called_pruned():
    card = model_card({"source": "HuggingFaceTB/SmolLM2-135M", "quantization": {"scheme": "nf4"}})
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "changed by layerprune" in card and "**Quantization:** nf4." in card
    assert "base_model" not in front_matter(model_card({"source": "/some/local/folder"}))
