"""Healing: (Q)LoRA through peft and the Trainer, merged into the unquantized weights; resume; bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import folder_digest
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerpruneError
from layerprune.healing import HealConfig, heal


def config(text, **changes):
    settings = dict(
        steps=8,
        batch_size=2,
        grad_accum=2,
        seq_len=64,
        data=str(text),
        lr=5e-3,
        save_every=4,
        validation_fraction=0.1,
        quant=False,
    )
    return HealConfig(**{**settings, **changes})


IDS = torch.arange(3, 40).unsqueeze(0)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_healing_lowers_validation_loss_and_writes_a_plain_checkpoint(base, text, tmp_path):
    before = folder_digest(base)
    out = heal(base, tmp_path / "healed", config(text, steps=30)).path
    assert folder_digest(base) == before
    record = json.loads((out / "layerprune.json").read_text())["healing"]
    assert record["validation_loss_after"] < record["validation_loss_before"] - 1.0
    assert record["method"] == "LoRA" and record["config"]["rank"] == 8 and record["tokens_per_second"] > 0
    curve = json.loads((out / "heal_curve.json").read_text())
    assert len(curve["train"]) == 30 and curve["validation"]
    assert (out / "heal_curve.png").read_bytes().startswith(b"\x89PNG")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in key for key in model.state_dict())
    assert not (tmp_path / ".healed.heal-work").exists()


def test_validation_runs_once_before_and_once_after_the_last_step(base, text, tmp_path, monkeypatch):
    """transformers 5 evaluates at the end of a run itself: that result is used, not computed twice."""
    from transformers import Trainer

    calls = []
    evaluate = Trainer.evaluate

    def counted(self, *args, **kwargs):
        result = evaluate(self, *args, **kwargs)
        calls.append((self.state.global_step, result["eval_loss"]))
        return result

    monkeypatch.setattr(Trainer, "evaluate", counted)
    out = heal(base, tmp_path / "healed", config(text, steps=5, eval_every=2)).path
    record = json.loads((out / "layerprune.json").read_text())["healing"]
    assert [step for step, _ in calls] == [0, 2, 4, 5]
    assert record["validation_loss_before"] == calls[0][1] and record["validation_loss_after"] == calls[-1][1]


def test_merged_checkpoint_equals_adapter_on_its_base(base, text, tmp_path):
    from peft import PeftModel

    out = heal(base, tmp_path / "healed", config(text), save_adapter=True).path
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").eval()
    torch.testing.assert_close(logits(merged), logits(with_adapter), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged), logits(AutoModelForCausalLM.from_pretrained(base).eval()), atol=1e-4)


def test_qlora_merges_into_the_original_unquantized_weights(base, text, tmp_path):
    out = heal(base, tmp_path / "healed", config(text, steps=3, quant=True)).path
    record = json.loads((out / "layerprune.json").read_text())["healing"]
    assert record["method"] == "QLoRA (NF4, double quantization)"
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )
    delta = merged["model.layers.0.mlp.up_proj.weight"] - original["model.layers.0.mlp.up_proj.weight"]
    assert 0 < delta.abs().max() < 0.05, "MLP weights are the originals plus a small LoRA delta, not NF4 copies"


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(base, text, tmp_path):
    settings = config(text, steps=8, save_every=2)
    uninterrupted = heal(base, tmp_path / "straight", settings).path
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        import layerprune.healing as healing
        from layerprune.healing import HealConfig, heal
        make = healing._progress_callback
        def killing(tokens_per_step):
            callback = make(tokens_per_step)
            original = callback.on_step_end
            def on_step_end(args, state, control, **kwargs):
                if state.global_step == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(args, state, control, **kwargs)
            callback.on_step_end = on_step_end
            return callback
        healing._progress_callback = killing
        heal({str(base)!r}, {str(tmp_path / "resumed")!r}, HealConfig(**{settings.__dict__!r}))
    """)
    killed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert killed.returncode == -9
    work = tmp_path / ".resumed.heal-work"
    assert not (tmp_path / "resumed").exists() and (work / "checkpoints" / "checkpoint-4").is_dir()
    resumed = heal(base, tmp_path / "resumed", settings).path
    assert not work.exists()
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(resumed)),
        logits(AutoModelForCausalLM.from_pretrained(uninterrupted)),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(LayerpruneError, match="already exists"):
        heal(base, tmp_path / "resumed", settings)


def test_resuming_with_other_settings_is_refused(base, text, tmp_path):
    work = tmp_path / ".healed.heal-work"
    work.mkdir()
    (work / "settings.json").write_text(json.dumps({"config": "something else"}))
    with pytest.raises(LayerpruneError, match="other settings"):
        heal(base, tmp_path / "healed", config(text))
    assert not (tmp_path / "healed").exists()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"rank": 0}, "rank must be at least 1"),
        ({"data": "/nowhere.txt"}, "not found"),
        ({"seq_len": 4096}, "too short for one training and one validation sequence"),
        ({"target_modules": "gate_proj,wrong_proj"}, "no module named wrong_proj"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(base, text, tmp_path, changes, fragment):
    with pytest.raises(LayerpruneError, match=fragment):
        heal(base, tmp_path / "healed", config(text, **changes))
    assert not (tmp_path / "healed").exists()


def test_four_bit_where_bitsandbytes_cannot_run_is_refused(base, text, tmp_path, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(LayerpruneError, match="bitsandbytes.*--no-quant"):
        heal(base, tmp_path / "healed", config(text, quant=True))
    assert not (tmp_path / "healed").exists()
