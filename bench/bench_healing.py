"""Healing speed and memory against a plain peft + Trainer script of the same settings.

    python bench/bench_healing.py MODEL --steps 8

Each side runs in its own subprocess, one after the other in this run (so both see the same
machine), on the same pruned model, data, sequences, LoRA and quantization settings. Reports
training tokens/s (from the Trainer's train_runtime, excluding load, eval and merge) and the
peak resident memory of each process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap

COMMON = """
import json, resource, time, torch
torch.set_num_threads(1)
from layerprune.healing.lora import HealConfig, training_blocks
from transformers import AutoTokenizer
config = HealConfig(steps={steps}, batch_size=4, grad_accum=1, seq_len=256, save_every=10_000, eval_every=10_000)
"""

OURS = (
    COMMON
    + """
from layerprune.healing.lora import heal
record = heal({model!r}, {out!r}, config).healing
print(json.dumps({{"tokens_per_second": record["tokens_per_second"],
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
)

# The baseline: what a user writes by hand with peft and the Trainer, same settings.
BASELINE = (
    COMMON
    + """
import datasets
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
tokenizer = AutoTokenizer.from_pretrained({model!r})
train, _ = training_blocks(tokenizer, config)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained({model!r}, quantization_config=quant, dtype=torch.float32,
                                             device_map="cpu")
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM",
                                         target_modules=["gate_proj", "up_proj", "down_proj"]))
args = TrainingArguments(output_dir={work!r}, max_steps={steps}, per_device_train_batch_size=4, learning_rate=3e-4,
                         lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({{"input_ids": train}}),
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
runtime = trainer.train().metrics["train_runtime"]
print(json.dumps({{"tokens_per_second": {steps} * 4 * 256 / runtime,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
)


def run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a checkpoint folder (for example a pruned SmolLM2)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for _ in range(args.rounds):  # alternating evens out load that changes during the run
        with tempfile.TemporaryDirectory() as tmp:
            runs["ours"].append(run(OURS.format(model=args.model, out=f"{tmp}/healed", steps=args.steps)))
            runs["baseline"].append(run(BASELINE.format(model=args.model, work=f"{tmp}/work", steps=args.steps)))
    ours, baseline = ({k: statistics.median(r[k] for r in runs[side]) for k in runs[side][0]} for side in runs)
    print(f"{'':22} {'tokens/s':>9} {'peak RSS MB':>12}")
    for name, result in (("layerprune heal", ours), ("peft + Trainer script", baseline)):
        print(f"{name:22} {result['tokens_per_second']:>9.1f} {result['peak_rss_mb']:>12.0f}")
    print(
        f"speed ratio (ours / baseline): {ours['tokens_per_second'] / baseline['tokens_per_second']:.2f}"
        f" (medians of {args.rounds} alternating rounds)"
    )
