"""Heal a pruned model: QLoRA fine-tuning with peft and the Hugging Face Trainer, then a merge.

Three objectives (`objective`): `lm`, the paper's next-token loss on the healing text;
`distill`, the KL divergence from the unpruned teacher's next-token distribution on the same
packed batches (Minitron, Sheared-LLaMA); `mixed`, alpha * distill + (1 - alpha) * lm. The
teacher runs in inference mode beside the student, 4-bit when the student is QLoRA; the KL over
the vocabulary is taken a chunk of positions at a time and recomputed in the backward pass, so
a 262k vocabulary does not multiply memory. LoRA goes on every layer, or only near the cut
(`target_layers near-cut[:k]`).

The paper's recipe (Gromov et al. 2024, section 3): the model loaded in 4-bit NF4 with double
quantization (bitsandbytes), LoRA adapters on the MLP modules only, trained on ordinary text
with a cosine schedule, then merged. The merge goes into the ORIGINAL unquantized weights,
not the dequantized 4-bit copy, so the output is a plain checkpoint that loads without
bitsandbytes or peft.

Because training runs through the Trainer, `accelerate launch -m layerprune heal ...` runs it
data-parallel on several GPUs or machines (DDP, or FSDP/DeepSpeed through an accelerate
config). Checkpoints go to a work folder beside the output every `save_every` steps; the
same command run again resumes from the last one, and the output appears only when done.

Cost: memory is the 4-bit base (about 0.6 bytes per parameter) plus activations of one
micro-batch; time is about 3 forward passes per sequence per step.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from layerprune._version import __version__
from layerprune.architectures import find_architecture
from layerprune.data import DEFAULT_CALIBRATION, load_documents
from layerprune.errors import LayerpruneError, require
from layerprune.io.checkpoint import (
    CONFIG_NAME,
    Source,
    Written,
    extend_record,
    read_header,
    read_record,
    shard_files,
    write_record,
    write_weights,
)
from layerprune.io.destinations import check_destination, claimed, staged
from layerprune.measure.divergence import distillation_loss
from layerprune.measure.residual import next_token_losses
from layerprune.plots import loss_curves
from layerprune.runtime.devices import Placement, Plan, is_main_process, on_main_process, plan_placement
from layerprune.runtime.models import (
    check_quantization,
    load_tokenizer,
    model_inputs,
    quantization_config,
    resolve_model,
)

OBJECTIVES = ("lm", "distill", "mixed")
TEACHER_DTYPES = ("nf4", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class HealConfig:
    """What to train. Every field's help is shown by `layerprune heal --help`."""

    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    objective: str = field(
        default="lm",
        metadata={"help": "lm (next-token loss, the paper's), distill (KL from the unpruned teacher), or mixed.",
                  "choices": OBJECTIVES},
    )  # fmt: skip
    alpha: float = field(default=0.5, metadata={"help": "Weight of distill in mixed: alpha*KL + (1-alpha)*lm."})
    temperature: float = field(
        default=1.0, metadata={"help": "Softens both distributions for distillation (the KL is scaled by T^2)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher for distill/mixed (default: the source named in layerprune.json)."}
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Teacher weights: nf4 (default with quant), bfloat16, float16 or float32 (default: the "
                          "student's).", "choices": TEACHER_DTYPES},
    )  # fmt: skip
    target_layers: str = field(
        default="all", metadata={"help": "all, or near-cut[:k]: LoRA only on the k kept layers (default 1) each side "
                                         "of each removed block."}
    )  # fmt: skip
    rank: int = field(default=8, metadata={"help": "LoRA rank; higher heals more and costs more memory."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to the rank)."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate of the cosine schedule."})
    warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps (cut to steps/10 for short runs)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per micro-batch per device."})
    grad_accum: int = field(default=4, metadata={"help": "Micro-batches per step (global batch 16 by default)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names, or all-linear (default: the family's MLP)."}
    )
    quant: bool = field(
        default=True, metadata={"help": "Load the base in 4-bit NF4 (QLoRA); the no- form: plain LoRA."}
    )
    data: str = field(
        default=DEFAULT_CALIBRATION, metadata={"help": "Training text: file, .jsonl, .parquet or built-in corpus."}
    )
    validation_fraction: float = field(default=0.05, metadata={"help": "Share of documents held out."})
    validation_sequences: int = field(
        default=16, metadata={"help": "Held-out sequences scored at each validation (at most)."}
    )
    eval_every: int | None = field(default=None, metadata={"help": "Validation every N steps (default steps/5)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, about 30% slower."}
    )
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N steps, for resuming."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, dropout and LoRA init."})
    placement: Placement = field(default_factory=Placement)  # inside prune --heal and sweep: theirs, unless set

    def __post_init__(self) -> None:
        checks = [
            (self.rank >= 1, f"rank must be at least 1, got {self.rank}"),
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch-size and grad-accum must be at least 1"),
            (self.seq_len >= 2, f"seq-len must be at least 2, got {self.seq_len}"),
            (0 < self.validation_fraction < 1, "validation fraction must be in (0, 1)"),
            (self.save_every >= 1, "save-every must be at least 1"),
            (self.validation_sequences >= 1, "validation-sequences must be at least 1"),
            (
                self.objective in OBJECTIVES,
                f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
            ),
            (0 <= self.alpha <= 1, f"--alpha must be between 0 and 1, got {self.alpha}"),
            (self.temperature > 0, f"--temperature must be above 0, got {self.temperature}"),
            (
                self.teacher_dtype in (None, *TEACHER_DTYPES),
                f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise LayerpruneError(message)
        parse_target_layers(self.target_layers)  # refused now, before anything loads

    @property
    def lora_scale(self) -> int:
        """LoRA's alpha: as given, or equal to the rank."""
        return self.lora_alpha if self.lora_alpha is not None else self.rank

    @property
    def distills(self) -> bool:
        return self.objective != "lm"

    @property
    def warmup(self) -> int:
        return min(self.warmup_steps, max(0, self.steps // 10))

    @property
    def near_cut(self) -> int | None:
        """The k of `near-cut[:k]` (None: LoRA on every layer)."""
        return parse_target_layers(self.target_layers)


def parse_target_layers(text: str) -> int | None:
    """`all` -> None; `near-cut` -> 1; `near-cut:k` -> k."""
    if text == "all":
        return None
    name, _, k = text.partition(":")
    if name != "near-cut" or not (k == "" or (k.isdigit() and int(k) >= 1)):
        raise LayerpruneError(f"--target-layers must be all, near-cut or near-cut:K (K >= 1), got {text!r}")
    return int(k) if k else 1


def pack_documents(tokenizer: Any, documents: list[str], seq_len: int) -> list[list[int]]:
    """Tokenize documents, join them with EOS and cut the stream into full `seq_len` blocks."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer(doc)["input_ids"] + eos)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def training_blocks(tokenizer: Any, config: HealConfig) -> tuple[list[list[int]], list[list[int]]]:
    """(train, validation) blocks; validation documents are held out before packing, so never trained on."""
    documents = load_documents(config.data)
    held = max(1, round(len(documents) * config.validation_fraction))
    if len(documents) < 2:
        raise LayerpruneError(f"data {config.data!r} needs at least 2 documents (one is held out for validation)")
    train = pack_documents(tokenizer, documents[:-held], config.seq_len)
    validation = pack_documents(tokenizer, documents[-held:], config.seq_len)[: config.validation_sequences]
    if not train or not validation:
        raise LayerpruneError(
            f"data {config.data!r} is too short for one training and one validation sequence of "
            f"{config.seq_len} tokens; give more text or a smaller --seq-len"
        )
    return train, validation


def _target_modules(model: Any, config: HealConfig) -> list[str] | str:
    if config.target_modules == "all-linear":
        return "all-linear"
    names = (
        [n.strip() for n in config.target_modules.split(",") if n.strip()]
        if config.target_modules
        else list(find_architecture(model.config).mlp_modules)
    )
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [n for n in names if n not in present]
    if missing or not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise LayerpruneError(
            f"no module named {', '.join(missing) or '(none)'} in the model; linear modules: "
            f"{', '.join(linear)} (or all-linear)"
        )
    return names


def near_cut_layers(record: dict[str, Any] | None, k: int) -> list[int]:
    """The pruned model's indices of the k kept layers on each side of each removed block, from its
    `layerprune.json` (`kept_layers` maps each new index to the original layer)."""
    if not record or not record.get("removed_layers"):
        raise LayerpruneError("--target-layers near-cut needs a pruned model (its layerprune.json names the cut)")
    kept, removed = record["kept_layers"], set(record["removed_layers"])
    near = set()
    for layer in removed:
        if layer - 1 not in removed:  # the first layer of a removed block
            near |= {j for j in range(layer - k, layer) if j in kept}
        if layer + 1 not in removed:  # the last
            near |= {j for j in range(layer + 1, layer + 1 + k) if j in kept}
    return sorted(kept.index(j) for j in near)


def load_for_training(path: Path, config: HealConfig, plan: Plan, layers: list[int] | None = None) -> Any:
    """The base model placed by `plan`, 4-bit NF4 with double quantization unless `quant` is off,
    with LoRA attached (to `layers` only, when given)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    storage = plan.torch_dtype if plan.sharded_by == "fsdp" else None
    quantization = quantization_config("nf4", plan.torch_dtype, storage) if config.quant else None
    placement = {} if plan.sharded_by else {"device_map": {"": plan.device}}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=plan.torch_dtype, quantization_config=quantization, **placement
    )
    _keep_four_bit_differentiable(model)
    if config.quant and not plan.sharded_by:  # its fp32 upcast of the other weights would defeat FSDP's sharding
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.enable_input_require_grads()  # what prepare_model_for_kbit_training does for checkpointing
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_scale,
        lora_dropout=config.dropout,
        target_modules=_target_modules(model, config),
        task_type="CAUSAL_LM",
        layers_to_transform=layers,
        layers_pattern=find_architecture(model.config).layers.rpartition(".")[2] if layers else None,
    )
    return get_peft_model(model, lora)


def _keep_four_bit_differentiable(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its fast CPU kernel. It does so the first
    time a layer runs in eval mode without gradients (the validation pass before training), and that
    kernel has no backward: every later gradient through the layer is silently dropped (the input's
    gradient is None; torch warns "an autograd kernel was not registered"). GPUs are unaffected."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def load_teacher(path: Path, config: HealConfig, plan: Plan) -> Any:
    """The teacher, frozen in inference mode on the training device (`plan`'s): 4-bit NF4 when the
    student is QLoRA (unless `teacher_dtype` says otherwise), else in the student's dtype."""
    from transformers import AutoModelForCausalLM

    kind = config.teacher_dtype or ("nf4" if config.quant else plan.dtype)
    quantization = quantization_config("nf4", plan.torch_dtype) if kind == "nf4" else None
    dtype = plan.torch_dtype if kind == "nf4" else kind
    teacher = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, quantization_config=quantization, device_map={"": plan.device}
    )
    return teacher.eval().requires_grad_(False)


def _distillation_trainer(teacher: Any, config: HealConfig, **kwargs: Any) -> Any:
    """A Trainer whose training loss is `config.objective`; evaluation reports the plain
    next-token loss whatever the objective, so validation curves compare across objectives."""
    import torch
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = outputs.loss
            if model.training:
                with torch.no_grad():
                    theirs = teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
                predicts = torch.zeros_like(inputs["labels"], dtype=torch.bool)
                predicts[:, :-1] = inputs["labels"][:, 1:] != -100  # position t predicts the real token t + 1
                kl = distillation_loss(outputs.logits, theirs, predicts, config.temperature)
                loss = kl if config.objective == "distill" else config.alpha * kl + (1 - config.alpha) * loss
            return (loss, outputs) if return_outputs else loss

    trainer = DistillationTrainer(**kwargs)
    trainer.model_accepts_loss_kwargs = False  # each micro-batch's loss is a mean: the Trainer averages them
    return trainer


def _progress_callback(tokens_per_step: int, validation_blocks: int) -> Any:
    """A Trainer callback: one progress bar with loss, live tokens/s and ETA, and one for each
    validation (one block a step on each process)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class HealProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.validating: Any = None
            self.started, self.first_step = 0.0, 0

        def rate(self, step: int) -> float:
            return (step - self.first_step) * tokens_per_step / max(time.perf_counter() - self.started, 1e-9)

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.perf_counter(), state.global_step
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="heal", unit="step")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is None or not logs:
                return
            self.bar.update(state.global_step - self.bar.n)
            if "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{self.rate(state.global_step):.0f}")

        def on_prediction_step(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.validating is None:
                total = math.ceil(validation_blocks / max(args.world_size, 1))
                self.validating = tqdm(total=total, desc="validating", unit="block", leave=False)
            self.validating.update()

        def on_evaluate(self, args, state, control, **kwargs):
            if self.validating is not None:
                self.validating.close()
                self.validating = None

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return HealProgress()


def _trainer(
    base: Path,
    tokenizer: Any,
    train: list,
    validation: list,
    config: HealConfig,
    plan: Plan,
    work: Path,
    progress: Any,
    teacher: Path | None = None,
) -> Any:
    """The Hugging Face Trainer over the (Q)LoRA model placed by `plan`: cosine schedule,
    checkpoints in `work`; with a `teacher`, the distillation objective."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    set_seed(config.seed)  # LoRA initialization
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=1,  # one sequence a batch: exact means whatever the process count
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=config.eval_every or max(1, config.steps // 5),
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        use_cpu=plan.device == "cpu",
        bf16=plan.dtype == "bfloat16",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    layers = near_cut_layers(read_record(base), config.near_cut) if config.near_cut else None
    settings = dict(
        model=load_for_training(base, config, plan, layers),
        args=args,
        train_dataset=[{"input_ids": block} for block in train],  # a list is a Dataset to the Trainer
        eval_dataset=[{"input_ids": block} for block in validation],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[progress],
    )
    if teacher:
        trainer = _distillation_trainer(load_teacher(teacher, config, plan), config, **settings)
    else:
        trainer = Trainer(**settings)
    for default in (ProgressCallback, PrinterCallback):  # our bar shows loss and tokens/s instead
        trainer.remove_callback(default)
    return trainer


def heal_work_dir(out: Path) -> Path:
    """Where a heal into `out` keeps what it needs to resume: settings, checkpoints, a pruned base."""
    return out.parent / f".{out.name}.heal-work"


def _start_or_resume(work: Path, settings: dict[str, Any], restart: bool) -> None:
    """Keep an interrupted run's work folder to resume from (if its settings are the same), or
    start a new one (`restart` discards an old one)."""
    record = work / "settings.json"
    if restart and work.exists():
        shutil.rmtree(work)
    if record.is_file():
        if json.loads(record.read_text()) != settings:
            raise LayerpruneError(
                f"an interrupted heal with other settings is in {work}; rerun it with the same settings, "
                "or pass --overwrite to start again"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))


def _last_checkpoint(work: Path) -> str | None:
    """The checkpoint an interrupted run left in `work`, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(work / "checkpoints")) if (work / "checkpoints").is_dir() else None


def validation_loss(model: Any, blocks: list[list[int]], progress: bool = False) -> float:
    """Mean next-token loss over every predicted token of the validation blocks (no gradients)."""
    import torch
    from tqdm.auto import tqdm

    training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        for block in tqdm(blocks, desc="validating", unit="block", leave=False, disable=not progress):
            ids = torch.tensor([block], device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            losses, mask = next_token_losses(model(**batch).logits, batch)
            total, count = total + float(losses[mask].sum()), count + int(mask.sum())
    model.train(training)
    return total / count


def merge_adapter(base: Path, adapter: Path, target: Path, progress: bool = False) -> None:
    """Merge a LoRA adapter into the base's original unquantized weights, in their own dtype.

    Streamed: one safetensors shard of the base at a time, each target weight W becoming
    W + (B @ A) * scaling as peft's own merge computes it, so host memory holds one shard plus the
    adapter whatever the model's size. Adapters that use what this does not cover (DoRA, per-layer
    ranks, extra trained modules) and `.bin` bases are merged by peft in memory instead.
    """
    config = json.loads((adapter / "adapter_config.json").read_text())
    plain = not (config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"))
    if not (plain and not config.get("modules_to_save") and shard_files(base)):
        _merge_in_memory(base, adapter, target)
        return
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    lora = load_file(adapter / "adapter_model.safetensors")
    pairs = {  # the base's key of each adapted weight: (A, B)
        key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"): (
            a,
            lora[key.replace("lora_A", "lora_B")],
        )
        for key, a in lora.items()
        if ".lora_A." in key
    }
    merged: set[str] = set()

    def merged_shard(shard: Path) -> list[tuple[str, Source]]:
        """The shard's tensors: those the adapter changes merged in memory, the others copied as bytes."""
        entries, _ = read_header(shard)
        changed = {}
        with safe_open(shard, framework="pt") as handle:
            for key in entries.keys() & pairs.keys():
                lora_a, lora_b = pairs[key]
                delta = (lora_b.float() @ lora_a.float()) * scaling
                weight = handle.get_tensor(key)
                changed[key] = (weight + (delta.T if config.get("fan_in_fan_out") else delta)).to(weight.dtype)
        merged.update(changed)
        return [(key, changed.get(key, entry)) for key, entry in entries.items()]

    shards = shard_files(base)
    metadata = read_header(shards[0])[1] or {"format": "pt"}
    progress_bar = tqdm(shards, desc="merging", unit="shard", disable=not progress)
    write_weights(target, (merged_shard(shard) for shard in progress_bar), len(shards), metadata)
    missing = sorted(set(pairs) - merged)
    if missing:
        raise LayerpruneError(f"the adapter changes {missing[0]}, which the base in {base} does not have")
    shutil.copy2(base / CONFIG_NAME, target / CONFIG_NAME)


def _merge_in_memory(base: Path, adapter: Path, target: Path) -> None:
    """peft's merge, with the whole base model in host memory at its stored precision."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(target)


class HealResult(Written):
    """A healed checkpoint: its folder and the `layerprune.json` written there."""

    @property
    def healing(self) -> dict[str, Any]:
        return self.record["healing"]


def heal(
    model: str | Path,
    out: str | Path,
    config: HealConfig | None = None,
    *,
    save_adapter: bool = False,
    overwrite: bool = False,
    restart: bool | None = None,
) -> HealResult:
    """Heal a model argument with (Q)LoRA into a new checkpoint folder `out`.

    `save_adapter` also keeps the LoRA adapter in `out/adapter`. An interrupted run with the same
    settings is resumed; `restart` (by default: `overwrite`) discards it instead.
    """
    config = config or HealConfig()
    require("peft")
    if config.quant:
        check_quantization(
            "nf4", "4-bit NF4 (QLoRA)", "; pass --no-quant (with prune or sweep: --heal-no-quant) for plain LoRA"
        )
    plan = plan_placement(config.placement, work="train")  # a missing device is refused before anything is written
    out = Path(out)
    inputs = [*model_inputs(model), *_data_inputs(config)]
    check = partial(check_destination, out, inputs, overwrite)
    with claimed(out, check) if is_main_process() else nullcontext():  # held from before the first step
        return _heal(model, out, config, plan, inputs, save_adapter, overwrite, restart)


def _data_inputs(config: HealConfig) -> list[Path]:
    """The local files a heal reads besides the model: its data and its teacher."""
    named = [config.data, config.teacher]
    return [Path(n).expanduser() for n in named if n and Path(str(n)).expanduser().exists()]


def _heal(
    model: str | Path,
    out: Path,
    config: HealConfig,
    plan: Plan,
    inputs: list[Path],
    save_adapter: bool,
    overwrite: bool,
    restart: bool | None,
) -> HealResult:
    """`heal` under the lock on its destination."""
    base = resolve_model(model, plan)
    work = heal_work_dir(out)
    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, validation = training_blocks(tokenizer, config)
    teacher = resolve_teacher(base, config, tokenizer) if config.distills else None
    if config.near_cut:
        near_cut_layers(read_record(base), config.near_cut)  # a model that was not pruned is refused before training
    settings = {"base": str(base.resolve()), "config": asdict(config), "layerprune_version": __version__}
    restart = overwrite if restart is None else restart
    on_main_process(lambda: _start_or_resume(work, settings, restart))  # one process writes, the others wait
    resume = _last_checkpoint(work)
    progress = _progress_callback(config.batch_size * config.grad_accum * config.seq_len, len(validation))
    trainer = _trainer(base, tokenizer, train, validation, config, plan, work, progress, teacher)
    started = time.perf_counter()
    before = work / "validation_loss_before.json"
    if resume is None:  # the pruned model's own validation loss, kept across a resume
        # not Trainer.evaluate: under DDP it shifts the data order
        loss = validation_loss(trainer.model, validation, progress=is_main_process())
        on_main_process(lambda: before.write_text(json.dumps(loss)))
    runtime = trainer.train(resume_from_checkpoint=resume).metrics["train_runtime"]
    trained_steps = config.steps - progress.first_step  # the steps this run did, after any resume
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] > progress.first_step]
    training_seconds = runtime - sum(e["eval_runtime"] for e in evaluations)  # train() times its evaluations too
    tokens_per_second = trained_steps * config.batch_size * config.grad_accum * config.seq_len / training_seconds
    final_eval = _final_validation_loss(trainer, evaluations, config.steps)
    history = _curve(trainer.state.log_history)
    healing = {
        "layerprune_version": __version__,
        "base": str(base),
        "config": asdict(config),
        "method": "QLoRA (NF4, double quantization)" if config.quant else "LoRA",
        "schedule": {
            "scheduler": "cosine",
            "peak_lr": config.lr,
            "warmup_steps": config.warmup,
            "steps": config.steps,
        },  # fmt: skip
        "objective": config.objective,
        "teacher": str(teacher) if teacher else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "train_blocks": len(train),
        "validation_blocks": len(validation),
        "validation_loss_before": json.loads(before.read_text()),
        "validation_loss_after": final_eval,
        "tokens_per_second": round(tokens_per_second, 1),  # training steps only: no load, evaluation or merge
        "seconds": round(time.perf_counter() - started, 1),
        "curve": history,
        "adapter_saved": save_adapter,
    }
    record = extend_record(base, "healing", healing, str(model))

    adapter = work / "adapter"
    trainer.save_model(str(adapter))  # every process takes part (FSDP and DeepSpeed gather the shards); one writes

    def write() -> None:
        """The adapter merged into the base's unquantized weights, with the tokenizer, the record
        and the curve; then the work folder is removed."""
        with staged(out, overwrite=overwrite, inputs=[*inputs, base]) as tmp:
            merge_adapter(base, adapter, tmp, progress=True)
            tokenizer.save_pretrained(tmp)
            if (base / "generation_config.json").is_file():
                shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
            if save_adapter:
                shutil.copytree(adapter, tmp / "adapter")
            write_record(tmp, record)
            (tmp / "heal_curve.json").write_text(json.dumps(history, indent=1) + "\n")
            loss_curves(history, tmp / "heal_curve.png")
        shutil.rmtree(work, ignore_errors=True)

    on_main_process(write)
    return HealResult(out, record)


def resolve_teacher(base: Path, config: HealConfig, tokenizer: Any) -> Path:
    """The distillation teacher: `config.teacher`, or the model `base` was pruned from (its
    layerprune.json's source). It must share the student's tokenizer and vocabulary."""
    from transformers import AutoConfig

    name = config.teacher or (read_record(base) or {}).get("source")
    if name is None:
        raise LayerpruneError(
            f"--objective {config.objective} needs a teacher: pass --teacher MODEL ({base} names no source model)"
        )
    path = resolve_model(name)
    vocabularies = [AutoConfig.from_pretrained(str(p)).get_text_config().vocab_size for p in (base, path)]
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab() or vocabularies[0] != vocabularies[1]:
        raise LayerpruneError(
            f"teacher {name} has another tokenizer or vocabulary than the model; distillation needs the same one"
        )
    return path


def _final_validation_loss(trainer: Any, evaluations: list[dict[str, Any]], steps: int) -> float:
    """The validation loss after the last step: the Trainer's own when it evaluated there (as
    transformers 5 does at the end of a run with step-wise evaluation), else evaluated now."""
    if evaluations and evaluations[-1]["step"] == steps:
        return evaluations[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _curve(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Train and validation loss by step, from the Trainer's log (which survives a resume)."""
    return {
        "train": [(e["step"], e["loss"]) for e in log_history if "loss" in e and math.isfinite(e["loss"])],
        "validation": [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e],
    }
