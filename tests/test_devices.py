"""The device policy: which device, dtype and dispatch each set of options gives on each kind of
machine (GPUs and memory faked), and models that run the same wherever they are placed."""

import json
from functools import partial

import pytest
import torch
from conftest import save_tiny, tiny_model
from typer.testing import CliRunner

import layerprune.runtime.devices as devices
from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.runtime.devices import Placement, Plan, checkpoint_dtype, model_bytes, plan_placement

GiB = 2**30
training_plan = partial(plan_placement, work="train")
quantized_plan = partial(plan_placement, work="quantize")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return save_tiny(tiny_model("llama").to(torch.bfloat16), tmp_path_factory.mktemp("bf16") / "model")


def test_a_checkpoint_dtype_and_size_come_from_its_headers(bf16_checkpoint):
    assert checkpoint_dtype(bf16_checkpoint) == "bfloat16"
    parameters = sum(p.numel() for p in tiny_model("llama").parameters())
    assert model_bytes(bf16_checkpoint, "bfloat16") == 2 * parameters
    assert model_bytes(bf16_checkpoint, "float32") == 4 * parameters


@pytest.mark.parametrize(
    ("device", "dtype", "gpus", "expected"),
    [
        ("auto", "auto", [], Plan("cpu", "float32")),  # no GPU: the CPU in fp32
        ("cpu", "bfloat16", [(80 * GiB, 80 * GiB)], Plan("cpu", "bfloat16")),  # asked for
        ("auto", "auto", [(80 * GiB, 80 * GiB)], Plan("cuda:0", "bfloat16")),  # the checkpoint's own dtype
        ("cuda", "float16", [(80 * GiB, 80 * GiB)], Plan("cuda:0", "float16")),
        ("cuda:1", "auto", [(80 * GiB, 80 * GiB), (10 * GiB, 80 * GiB)], Plan("cuda:1", "bfloat16")),
    ],
)
def test_the_plan_for_each_set_of_options_and_machine(bf16_checkpoint, device, dtype, gpus, expected):
    plan = plan_placement(Placement(device, dtype), bf16_checkpoint, gpus=gpus)
    assert (plan.device, plan.dtype, plan.device_map) == (expected.device, expected.dtype, None)


def test_a_model_larger_than_one_gpu_is_spread_over_gpus_then_host_memory(bf16_checkpoint, monkeypatch):
    size = model_bytes(bf16_checkpoint, "bfloat16")
    monkeypatch.setattr(devices, "memory_available", lambda: 64 * GiB)
    two_small_gpus = [(size // 2, 80 * GiB), (size, 80 * GiB)]
    plan = plan_placement(Placement(), bf16_checkpoint, gpus=two_small_gpus)
    assert plan.device == "cuda:0" and plan.device_map == "auto"
    assert plan.max_memory == {0: int(0.7 * (size // 2)), 1: int(0.7 * size), "cpu": int(0.7 * 64 * GiB)}
    only_one = plan_placement(Placement("cuda:1"), bf16_checkpoint, gpus=[(size * 2, 0), (size // 2, 0)])
    assert list(only_one.max_memory) == [1, "cpu"], "an explicit GPU is used alone, then host memory"


@pytest.mark.parametrize(
    ("device", "gpus", "fragment"),
    [
        ("cuda:7", [(GiB, GiB)], "--device cuda:7: this machine has 1 GPU(s) (cuda:0)"),
        ("cuda", [], "--device cuda: no CUDA GPU is visible on this machine"),
    ],
)
def test_a_device_the_machine_lacks_is_refused(bf16_checkpoint, device, gpus, fragment):
    with pytest.raises(LayerpruneError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_placement(Placement(device), bf16_checkpoint, gpus=gpus)


@pytest.mark.parametrize(("option", "value"), [("--device", "gpu0"), ("--device", "cuda:7"), ("--dtype", "int8")])
def test_bad_device_options_are_one_line_on_the_command_line(bf16_checkpoint, tmp_path, option, value):
    result = CliRunner().invoke(app, ["analyze", str(bf16_checkpoint), "--out", str(tmp_path / "a"), option, value])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: --")
    assert not (tmp_path / "a").exists()


def test_the_plan_is_printed_and_recorded(bf16_checkpoint, tmp_path):
    result = CliRunner().invoke(
        app, ["analyze", str(bf16_checkpoint), "--out", str(tmp_path / "a"), "--samples", "2", "--seq-len", "16"]
    )
    assert result.exit_code == 0, result.output
    assert "(cpu, float32)" in result.stdout
    extra = json.loads((tmp_path / "a" / "distances.json").read_text())["extra"]
    assert extra.pop("fingerprint")  # of the model's config (see test_analysis)
    assert extra.pop("seconds") >= 0  # what the analysis took (a sweep's report shows it)
    assert extra == {"offload": False, "device": "cpu", "dtype": "float32", "device_map": None}


def test_training_and_quantized_export_take_their_device_from_the_same_place(monkeypatch):
    assert (training_plan().device, training_plan().dtype) == ("cpu", "float32")
    assert (quantized_plan().device, quantized_plan().device_map) == ("cpu", None)
    monkeypatch.setattr(devices, "visible_gpus", lambda: [(80 * GiB, 80 * GiB)] * 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert (training_plan().device, training_plan().dtype) == ("cuda:0", "bfloat16")  # this process's local rank
    assert (quantized_plan().device_map, quantized_plan().dtype) == ("auto", "bfloat16")


def test_bf16_only_on_a_gpu_that_has_it(monkeypatch):
    from layerprune.runtime.devices import working_dtype

    monkeypatch.setattr(devices, "visible_gpus", lambda: [(16 * GiB, 16 * GiB)])
    assert working_dtype("cpu") == "float32"
    for supported, expected in ((True, "bfloat16"), (False, "float16")):  # e.g. a T4 or a V100: fp16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert working_dtype("cuda:0") == quantized_plan().dtype == expected
        assert plan_placement(Placement(), None).dtype == expected
        assert training_plan().dtype == ("bfloat16" if supported else "float32")  # fp16 would need loss scaling


def test_heal_and_export_take_the_placement_asked_for(monkeypatch):
    from layerprune.healing.lora import HealConfig
    from layerprune.recipes.pipeline import with_placement
    monkeypatch.setattr(devices, "visible_gpus", lambda: [(16 * GiB, 16 * GiB)] * 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert (training_plan(Placement("cpu")).device, training_plan(Placement("cpu")).dtype) == ("cpu", "float32")
    assert training_plan(Placement("cuda:1", "float32")).device == "cuda:1"
    assert (quantized_plan(Placement("cpu")).device, quantized_plan(Placement("cpu")).device_map) == ("cpu", None)
    assert quantized_plan(Placement("cuda:1")).device_map is None and quantized_plan().device_map == "auto"
    with pytest.raises(LayerpruneError, match="this machine has 2 GPU"):
        training_plan(Placement("cuda:2"))
    # a heal inside prune or sweep trains where that command runs, unless told otherwise
    assert with_placement(HealConfig(), Placement("cpu")).placement == Placement("cpu")
    assert with_placement(HealConfig(placement=Placement("cuda:1")), Placement("cpu")).placement.device == "cuda:1"


def test_heal_on_a_gpu_the_machine_lacks_is_one_line_and_writes_nothing(bf16_checkpoint, tmp_path):
    for command in (["heal", "--no-quant", "--steps", "1"], ["export", "--quantize", "nf4"]):
        done = CliRunner().invoke(app, [command[0], str(bf16_checkpoint), "--out", str(tmp_path / "out"),
                                        "--device", "cuda", *command[1:]])  # fmt: skip
        assert done.exit_code == 1 and "no CUDA GPU is visible" in done.output, done.output
        assert done.output.strip().count("\n") == 0 and list(tmp_path.iterdir()) == []


def test_under_fsdp_or_deepspeed_the_launcher_places_the_weights(monkeypatch):
    from layerprune.runtime.models import quantization_config


    assert training_plan().sharded_by is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert training_plan().sharded_by == "fsdp"
    nf4 = quantization_config("nf4", torch.bfloat16, torch.bfloat16)
    assert nf4.bnb_4bit_quant_storage == torch.bfloat16, "FSDP shards 4-bit weights stored in the compute dtype"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert training_plan().sharded_by == "deepspeed"


def test_layer_by_layer_as_asked_else_exactly_when_the_weights_would_not_fit(tmp_path, monkeypatch, capsys):
    """The one "stream or load whole?" decision of analysis and repair: `--offload` as given, else
    layer by layer when the checkpoint would not fit, said in one line; quiet otherwise."""
    import layerprune.runtime.memory as memory

    src = save_tiny(tiny_model("llama"), tmp_path / "model")
    plan = Plan("cpu", "float32")
    monkeypatch.setattr(memory, "memory_available", lambda: 100_000)  # less than the tiny model's weights
    assert devices.layer_by_layer(plan, src, False, "tiny", "repairing") is False
    assert capsys.readouterr().out == ""
    assert devices.layer_by_layer(plan, src, None, "tiny", "repairing") is True
    said = "tiny would not fit in the memory of cpu: repairing one layer at a time (--offload)\n"
    assert capsys.readouterr().out == said
    monkeypatch.setattr(memory, "memory_available", lambda: 2**40)
    assert devices.layer_by_layer(plan, src, None, "tiny", "repairing") is False
    assert devices.layer_by_layer(plan, src, True, "tiny", "repairing") is True
    assert capsys.readouterr().out == ""
