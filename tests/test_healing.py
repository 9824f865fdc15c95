"""Healing: (Q)LoRA through peft and the Trainer, merged into the unquantized weights; resume; bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import folder_digest, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerpruneError
from layerprune.healing.lora import HealConfig, heal
from layerprune.runtime.devices import Plan


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
CPU = Plan("cpu", "float32")  # where the tests train


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
    """Before training, one plain pass (the Trainer's own evaluation there would shift the data
    order under DDP); after, transformers 5 evaluates at the end of a run itself: that result is
    used, not computed twice."""
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
    assert [step for step, _ in calls] == [2, 4, 5]
    assert record["validation_loss_after"] == calls[-1][1]
    from layerprune.healing.lora import training_blocks, validation_loss
    from layerprune.runtime.models import load_tokenizer

    _, validation = training_blocks(load_tokenizer(base), config(text, steps=5, eval_every=2))
    plain = validation_loss(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), validation)
    assert record["validation_loss_before"] == pytest.approx(plain, rel=1e-6)


def test_merged_checkpoint_equals_adapter_on_its_base(base, text, tmp_path):
    from peft import PeftModel

    out = heal(base, tmp_path / "healed", config(text), save_adapter=True).path
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").eval()
    torch.testing.assert_close(logits(merged), logits(with_adapter), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged), logits(AutoModelForCausalLM.from_pretrained(base).eval()), atol=1e-4)


def test_qlora_gradients_flow_through_the_four_bit_layers_after_an_eval_pass(base, text):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a kernel without a backward
    the first time the layer runs in eval mode without gradients (heal's first validation): the
    gradient through every base layer was then silently dropped."""
    from layerprune.healing.lora import load_for_training

    def lora_gradients(evaluate_first: bool) -> tuple[dict, list]:
        torch.manual_seed(0)
        model = load_for_training(base, config(text, quant=True, dropout=0.0), CPU)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=IDS)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        packed = [m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None
                  and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]  # fmt: skip
        return {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}, packed

    (plain, _), (after_eval, packed) = lora_gradients(False), lora_gradients(True)
    assert packed == [] and plain.keys() == after_eval.keys() and len(plain) > 0
    assert all(torch.allclose(after_eval[name], plain[name], atol=1e-6) for name in plain)


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


@pytest.mark.parametrize("objective", ["lm", "distill"])
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(base, text, tmp_path, objective):
    from layerprune import prune

    if objective != "lm":  # the teacher is the model it was pruned from, named in its layerprune.json
        base = prune(base, tmp_path / "pruned", layers=[3, 4]).path
    settings = config(text, steps=8, save_every=2, objective=objective)
    uninterrupted = heal(base, tmp_path / "straight", settings).path
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        import layerprune.healing.lora as healing
        from layerprune.runtime.devices import Placement
        from layerprune.healing.lora import HealConfig, heal
        make = healing._progress_callback
        def killing(*args):
            callback = make(*args)
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
        ({"alpha": 1.5}, "--alpha must be between 0 and 1, got 1.5"),
        ({"alpha": -0.1}, "--alpha must be between 0 and 1, got -0.1"),
        ({"temperature": 0}, "--temperature must be above 0, got 0"),
        ({"objective": "distill"}, "--objective distill needs a teacher: pass --teacher MODEL"),
        ({"objective": "mixed", "teacher": "/nowhere/model"}, "nowhere"),
        ({"target_layers": "near-cut"}, "near-cut needs a pruned model"),
        ({"target_layers": "near-cut:0"}, "--target-layers must be all, near-cut or near-cut:K"),
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


def lora_adapter(model, folder, targets):
    """A LoRA adapter on `model` with random A and B (a trained one is not zero), saved to `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("family", "dtype", "targets"),
    [
        ("llama", torch.float32, ["gate_proj", "up_proj", "down_proj"]),
        ("llama", torch.bfloat16, ["q_proj", "down_proj"]),
        ("gpt2", torch.float32, ["c_fc", "c_proj"]),  # Conv1D: peft transposes (fan_in_fan_out)
        ("qwen3", torch.bfloat16, ["up_proj"]),
    ],
)
def test_the_streamed_merge_equals_peft_merging_in_memory_to_the_bit(tmp_path, family, dtype, targets):
    from layerprune.healing.lora import _merge_in_memory, merge_adapter

    base = save_tiny(tiny_model(family).to(dtype), tmp_path / "base", shard_size="60KB")
    adapter = lora_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), tmp_path / "adapter", targets)
    (tmp_path / "streamed").mkdir()
    (tmp_path / "in-memory").mkdir()
    merge_adapter(base, adapter, tmp_path / "streamed")
    _merge_in_memory(base, adapter, tmp_path / "in-memory")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype="auto").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory", dtype="auto").state_dict()
    original = AutoModelForCausalLM.from_pretrained(base, dtype="auto").state_dict()
    assert streamed.keys() == reference.keys()
    assert all(streamed[k].dtype == dtype and torch.equal(streamed[k], reference[k]) for k in streamed)
    changed = [k for k in streamed if not torch.equal(streamed[k], original[k])]
    assert changed and all(any(t in k for t in targets) for k in changed)


def peak_growth(function: str, *args: Path) -> int:
    """Bytes by which a call of `layerprune.healing.lora.<function>` raises the resident peak of a fresh
    process above what it holds before the call (the kernel's high-water mark, reset first)."""
    probe = (
        "import re, sys, pathlib, torch, safetensors.torch, peft, transformers, layerprune.healing.lora as h\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM\n"
        "before = status('VmRSS')\n"
        f"h.{function}(*map(pathlib.Path, sys.argv[1:]))\n"
        "print(status('VmHWM') - before)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_the_streamed_merge_grows_with_its_shards_not_with_the_model(tmp_path):
    """Peak memory grows with the largest shard, not with the model. Measured in shards of 11 MB,
    from run to run: 42-59 MB on 8 layers (100 MB; peft's in-memory merge: 133 MB) and 43-66 MB on
    these 16 layers (200 MB), so the bound is set at 7 shards, far below the model."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    base = save_tiny(model, tmp_path / "base", shard_size="12MB")
    adapter = lora_adapter(model, tmp_path / "adapter", ["up_proj", "down_proj"])
    shards = [p.stat().st_size for p in base.glob("*.safetensors")]
    assert sum(shards) > 16 * max(shards), "a model of many shards"
    for name in ("streamed", "in-memory"):
        (tmp_path / name).mkdir()
    streamed = peak_growth("merge_adapter", base, adapter, tmp_path / "streamed")
    in_memory = peak_growth("_merge_in_memory", base, adapter, tmp_path / "in-memory")
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    assert streamed < 7 * max(shards) + adapter_bytes < 0.5 * sum(shards) < in_memory, (streamed, in_memory, shards)


def test_gradient_checkpointing_trades_time_for_memory_not_results(base, text, tmp_path):
    from safetensors.torch import load_file

    plain = heal(base, tmp_path / "plain", config(text, steps=3, dropout=0.0)).path
    recomputed = heal(base, tmp_path / "checkpointed", config(text, steps=3, dropout=0.0, gradient_checkpointing=True))
    assert recomputed.healing["config"]["gradient_checkpointing"] is True
    a, b = load_file(plain / "model.safetensors"), load_file(recomputed.path / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_the_distillation_loss_is_torch_kl_div_computed_directly():
    from layerprune.measure.divergence import distillation_loss

    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        ours, theirs = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    found = distillation_loss(ours, theirs, mask, temperature=2.0, chunk=5)
    direct = torch.nn.functional.kl_div(
        torch.log_softmax(ours[mask] / 2, -1), torch.log_softmax(theirs[mask] / 2, -1), log_target=True,
        reduction="batchmean",
    ) * 4  # fmt: skip
    assert found.item() == pytest.approx(direct.item(), rel=1e-5) and found.item() > 0


def test_a_student_equal_to_its_teacher_has_zero_loss_and_no_gradient():
    from layerprune.measure.divergence import distillation_loss

    teacher = tiny_model("llama", seed=1)
    logits_ = teacher(input_ids=torch.randint(3, 200, (2, 10))).logits.detach()
    student = logits_.clone().requires_grad_(True)
    loss = distillation_loss(student, logits_, torch.ones(2, 10, dtype=torch.bool), chunk=4)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and student.grad.abs().max().item() < 1e-7


def test_the_chunked_loss_and_its_gradient_equal_autograd_through_kl_div():
    from layerprune.measure.divergence import distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(3, 7, 40)
    mask = torch.rand(3, 7) > 0.3
    student = torch.randn(3, 7, 40).requires_grad_(True)
    found = distillation_loss(student, teacher, mask, temperature=1.5, chunk=2)
    (found_grad,) = torch.autograd.grad(found, student)
    direct = torch.nn.functional.kl_div(
        torch.log_softmax(student[mask] / 1.5, -1), torch.log_softmax(teacher[mask] / 1.5, -1), log_target=True,
        reduction="batchmean",
    ) * 1.5**2  # fmt: skip
    (direct_grad,) = torch.autograd.grad(direct, student)
    assert found.item() == pytest.approx(direct.item(), rel=1e-6)
    torch.testing.assert_close(found_grad, direct_grad, rtol=1e-5, atol=1e-8)
    whole = distillation_loss(student, teacher, mask, temperature=1.5, chunk=1000)
    assert whole.item() == pytest.approx(found.item(), rel=1e-6)


PEAK = textwrap.dedent("""
    import sys, torch
    from layerprune.measure.divergence import distillation_loss
    def high_water():  # this process's own peak (ru_maxrss would carry the parent's across exec)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    teacher = torch.randn(1, 512, 262144)  # Gemma 3's vocabulary, 512 positions: 512 MiB of fp32 logits
    student = torch.randn(1, 512, 262144).requires_grad_(True)
    mask = torch.ones(1, 512, dtype=torch.bool)
    before = high_water()
    if sys.argv[1] == "chunked":
        distillation_loss(student, teacher, mask).backward()
    else:  # the plain computation, through autograd
        ours, theirs = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
        torch.nn.functional.kl_div(ours, theirs, log_target=True, reduction="batchmean").backward()
    print(high_water() - before)
""")


@pytest.mark.slow
def test_the_loss_of_a_262k_vocabulary_stays_within_its_stated_memory():
    """Beyond the two logits tensors: the student's gradient (one more) and a few chunks of 64 MiB."""
    logits_bytes = 512 * 262144 * 4
    peaks = {}
    for mode in ("chunked", "plain"):
        done = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[mode] = int(done.stdout.split()[-1])
    print(f"peak beyond the inputs, in logits tensors: chunked {peaks['chunked'] / logits_bytes:.2f}, "
          f"plain {peaks['plain'] / logits_bytes:.2f}")  # fmt: skip
    assert peaks["chunked"] <= logits_bytes + 6 * 2**26  # measured: the gradient and 4.1 chunks
    assert peaks["plain"] >= 2.5 * logits_bytes


def test_near_cut_puts_lora_only_beside_each_removed_block(base, text, tmp_path):
    from layerprune import prune
    from layerprune.healing.lora import near_cut_layers

    record = {"removed_layers": [1, 2, 5], "kept_layers": [0, 3, 4, 6, 7]}
    assert near_cut_layers(record, 1) == [0, 1, 2, 3]  # layers 0, 3 beside 1-2; 4, 6 beside 5
    assert near_cut_layers({"removed_layers": [3], "kept_layers": [0, 1, 2, 4, 5]}, 2) == [1, 2, 3, 4]
    pruned = prune(base, tmp_path / "pruned", layers=[2]).path  # 6 layers: kept 0 1 3 4 5 -> new 0..4
    everywhere = heal(pruned, tmp_path / "all", config(text, steps=2))
    near = heal(pruned, tmp_path / "near", config(text, steps=2, target_layers="near-cut"))
    assert near.healing["trainable_parameters"] * 5 == everywhere.healing["trainable_parameters"] * 2
    merged, original = (AutoModelForCausalLM.from_pretrained(p) for p in (near.path, pruned))
    changed = {
        name.split(".")[2] for name, w in merged.state_dict().items() if not torch.equal(w, original.state_dict()[name])
    }
    assert changed == {"1", "2"}  # the new indices of layers 1 and 3, beside the removed layer 2


def test_distillation_heals_toward_the_teacher_and_records_it(base, text, tmp_path):
    from layerprune import prune

    pruned = prune(base, tmp_path / "pruned", layers=[3, 4]).path
    healed = heal(pruned, tmp_path / "healed", config(text, steps=6, objective="mixed", alpha=0.7, temperature=2.0))
    assert healed.healing["objective"] == "mixed" and healed.healing["teacher"] == str(base)
    assert healed.healing["validation_loss_after"] < healed.healing["validation_loss_before"]
    assert healed.healing["config"]["alpha"] == 0.7


def test_the_teacher_of_a_qlora_student_is_four_bit_unless_told_otherwise(base, text):
    """A 4-bit student gets a 4-bit teacher (the issue's memory rule), frozen in inference mode;
    --teacher-dtype overrides it. The 4-bit teacher is still that model: its next-token
    distributions sit far nearer the full-precision teacher's than another model's do (NF4 errs by
    about 9% per weight, which compounds through a random tiny model)."""
    from bitsandbytes.nn import Linear4bit

    from layerprune.healing.lora import load_teacher

    four_bit = load_teacher(base, config(text, quant=True, objective="distill"), CPU)
    plain = load_teacher(base, config(text, quant=True, objective="distill", teacher_dtype="float32"), CPU)
    assert any(isinstance(module, Linear4bit) for module in four_bit.modules())
    assert not any(isinstance(module, Linear4bit) for module in plain.modules())
    for teacher in (four_bit, plain):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    reference = torch.log_softmax(logits(plain), -1)
    kl = lambda model: (reference.exp() * (reference - torch.log_softmax(logits(model), -1))).sum(-1).mean()  # noqa: E731
    assert 0 < kl(four_bit) < kl(tiny_model("llama", seed=3).eval()) / 3


def test_a_teacher_with_another_tokenizer_is_one_line_and_leaves_nothing(base, text, tmp_path):
    from conftest import tiny_tokenizer
    from typer.testing import CliRunner

    from layerprune import prune
    from layerprune.cli import app

    pruned = prune(base, tmp_path / "pruned", layers=[3]).path
    other = tmp_path / "other"
    tiny_model("llama", seed=3).save_pretrained(other)
    changed = tiny_tokenizer()
    changed.add_tokens(["<extra>"])
    changed.save_pretrained(other)
    before = folder_digest(pruned)
    args = ["heal", str(pruned), "--out", str(tmp_path / "healed"), "--objective", "distill", "--teacher", str(other),
            "--data", str(text), "--no-quant", "--steps", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    message = f"teacher {other} has another tokenizer or vocabulary than the model; distillation needs the same one"
    assert result.stderr == f"error: {message}\n"
    assert not (tmp_path / "healed").exists() and not list(tmp_path.glob(".healed*"))
    assert folder_digest(pruned) == before
