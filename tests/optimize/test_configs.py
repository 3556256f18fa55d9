"""optimize.configs: each option's check refuses a bad value with a message naming the option.

tests/optimize/test_options.py covers how flags are built from these classes (defaults, help, choices); this
module covers the rules between values and the properties the stages read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from optimize import configs
from optimize.configs import (BenchmarkConfig, BuildConfig, CalibConfig, DistillConfig, ExportConfig, GpuCheckConfig,
                              InferConfig, LoopConfig, PackageConfig, PruneConfig, SearchConfig, ServeConfig,
                              check_profile, parse_size)
from optimize.errors import ConfigError


@pytest.mark.parametrize("values, flag", [
    ({"epochs": 0}, "--epochs must be at least 1 (got 0)"),
    ({"batch_size": 0}, "--batch-size must be at least 1 (got 0)"),
    ({"lr": 0.0}, "--lr must be positive (got 0.0)"),
    ({"step_size": 0}, "--step-size must be at least 1"),
    ({"patience": -1}, "--patience must be 0 (off) or more"),
    ({"accumulate": 0}, "--accumulate must be at least 1 (got 0)"),
    ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
    ({"warmup": 1.0}, "--warmup must be in [0, 1) (got 1.0)"),
    ({"clip_grad_norm": 0.0}, "--clip-grad-norm must be positive (got 0.0)"),
    ({"workers": -1}, "--workers must be 0 or more"),
    ({"schedule": "linear"}, "--schedule must be one of warmup-cosine, cosine, step, plateau, none (got 'linear')"),
])
def test_loop_options_are_checked_naming_the_flag(values, flag):
    with pytest.raises(ConfigError) as info:
        LoopConfig(**values)
    assert str(info.value) == flag


def test_loop_defaults_depend_on_the_optimizer():
    assert (LoopConfig().peak_lr, LoopConfig().decay) == (2e-3, 0.05)
    assert (LoopConfig(optimizer="sgd").peak_lr, LoopConfig(optimizer="sgd").decay) == (0.05, 5e-4)
    given = LoopConfig(optimizer="sgd", lr=0.2, weight_decay=0.0)
    assert (given.peak_lr, given.decay) == (0.2, 0.0)  # a 0 decay given is kept, not replaced by the default


@pytest.mark.parametrize("values, message", [
    ({"method": "2:4", "amount": 0.5}, "--method 2:4 always keeps 2 of every 4 weights; drop --amount"),
    ({"method": "2:4", "steps": 2}, "--method 2:4 is one round; drop --steps"),
    ({"amount": 1.0}, r"--amount must be in \[0, 1\) \(got 1.0\)"),
    ({"amount": 0.8}, "--amount 0.8 is above --max-layer-amount 0.75; .* raise --max-layer-amount"),
    ({"max_layer_amount": 1.0}, r"--max-layer-amount must be in \(0, 1\)"),
    ({"steps": 0}, "--steps and --round-to >= 1"),
    ({"bn_images": -1}, "--bn-images must be 0 .off. or more"),
    ({"temperature": 0.0}, "--temperature must be positive"),
    ({"alpha": 1.5}, r"--alpha must be in \[0, 1\]"),
])
def test_prune_options_are_checked_together(values, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(model="s.pth", out="p.pth", **values)


def test_prune_target_defaults_to_half():
    assert PruneConfig(model="s.pth", out="p.pth").target == 0.5
    assert PruneConfig(model="s.pth", out="p.pth", amount=0.0).target == 0.0


@pytest.mark.parametrize("make, message", [
    (lambda: DistillConfig(teacher="t.pth", out="s.pth", alpha=-0.1), r"--alpha must be in \[0, 1\] \(got -0.1\)"),
    (lambda: ExportConfig(model="m.pth", out="m.onnx", atol=float("nan")), "--atol must be a finite number above 0"),
    (lambda: ExportConfig(model="m.pth", out="m.onnx", rtol=-1.0), "--rtol must be a finite number of 0 or more"),
    (lambda: ExportConfig(model="m.pth", out="m.onnx", opset=3), r"--opset 3: torch .* writes opsets"),
    (lambda: CalibConfig(onnx="m.onnx", out="q.onnx", form="qdq-s8s8"), "--form 'qdq-s8s8' needs --target cpu"),
    (lambda: CalibConfig(onnx="m.onnx", out="q.onnx", num_images=0), "--num-images and --batch-size"),
    (lambda: InferConfig(model="m.onnx"), "give at least one image file or folder"),
    (lambda: InferConfig(model="m.onnx", images=("a.png",), image_size=4), "--image-size must be at least 8"),
    (lambda: ServeConfig(model="m.onnx", port=70000), "--port within 0..65535"),
    (lambda: ServeConfig(model="m.onnx", timeout_s=0), "--timeout must be above 0 seconds"),
    (lambda: PackageConfig(model="m.onnx", out="d", name="my model"), "--name 'my model': use letters, digits"),
    (lambda: PackageConfig(model="m.onnx", out="d", check_batch_sizes=()), "--check-batch-sizes must be positive"),
    (lambda: GpuCheckConfig(rounds=0), "--seconds must be > 0 and --rounds >= 1"),
    (lambda: SearchConfig(teacher="t.pth", student="s.pth", space="training"), "drop --student"),
    (lambda: SearchConfig(teacher="t.pth", heartbeat=60, grace_period=60), "--grace-period longer than --heartbeat"),
    (lambda: SearchConfig(teacher="t.pth", trials=0), "--trials must be at least 1"),
])
def test_stage_options_are_checked_naming_the_flag(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp16"}, "--precision fp16 is not offered for --backend onnxruntime"),
    ({"backend": "openvino", "precision": "fp16"}, "--precision fp16 is not offered for --backend openvino"),
    ({"nncf_preset": "mixed"}, "--nncf-preset and --nncf-model-type are OpenVINO options"),
    ({"sparse_weights": True}, "--sparse-weights, --dla-core, .* are TensorRT options"),
    ({"backend": "tensorrt", "tf32": True, "precision": "fp16"}, "--tf32 applies to --precision fp32 only, not fp16"),
    ({"backend": "tensorrt", "compare_seconds": 0}, "--compare-rounds must be >= 0 and --compare-seconds > 0"),
    ({"backend": "tensorrt", "min_batch": 8, "opt_batch": 4}, r"1 <= --min-batch \(8\) <= --opt-batch \(4\)"),
    ({"backend": "tensorrt", "max_batch": 8192, "opt_batch": 8}, "--max-batch 8192 is beyond any device's memory"),
    ({"backend": "tensorrt", "precision": "fp16", "dla_core": 0}, "--dla-core needs a static batch"),
    ({"backend": "tensorrt", "dla_core": 0, "min_batch": 8, "max_batch": 8}, "--dla-core needs --precision fp16 or"),
    ({"backend": "tensorrt", "workspace": "lots"}, "--workspace: cannot read size 'LOTS'"),
])
def test_build_options_belong_to_their_backend(values, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(onnx="m.onnx", out="e", **values)


def test_a_static_dla_build_is_accepted():
    cfg = BuildConfig(onnx="m.onnx", out="e", backend="tensorrt", precision="int8", dla_core=1, min_batch=4,
                      opt_batch=4, max_batch=4)
    assert cfg.dla_core == 1


@pytest.mark.parametrize("text, size", [("2G", 2 << 30), ("512M", 512 << 20), ("64kb", 64 << 10), ("1.5G", 3 << 29),
                                        ("1073741824", 1 << 30), (4096, 4096)])
def test_workspace_sizes_read_as_bytes(text, size):
    assert parse_size(text) == size


def test_the_batch_profile_rule_accepts_equal_bounds():
    check_profile(1, 1, 1)
    check_profile(1, 8, 4096)
    with pytest.raises(ConfigError, match=r"1 <= --min-batch \(0\)"):
        check_profile(0, 1, 1)


def test_an_engine_profile_and_a_benchmark_stop_at_the_same_batch():
    """One largest batch (configs.MAX_BATCH): a profile may reach it, and so may the batches a benchmark times."""
    check_profile(1, 8, configs.MAX_BATCH)
    with pytest.raises(ConfigError, match=f"--max-batch {configs.MAX_BATCH + 1} .* use {configs.MAX_BATCH} or less"):
        check_profile(1, 8, configs.MAX_BATCH + 1)


@pytest.mark.parametrize("values, message", [
    ({"models": ()}, "give at least one model to benchmark"),
    ({"batch_sizes": (1, 0)}, "--batch-sizes must be positive integers"),
    ({"batch_sizes": (configs.MAX_BATCH + 1,)}, "--batch-sizes above 4096 images are no deployment batch"),
    ({"rounds": 0}, "--rounds >= 1"),
    ({"min_speedup": 0}, "--min-speedup must be > 0, not 0"),
    ({"input_size": 4}, "--input-size must be at least 8 pixels"),
    ({"tf32": True}, "--tf32 is a CUDA mode; use it with --device cuda"),
    ({"threads": 0}, "--threads must be between 1 and"),
])
def test_benchmark_options_are_checked_naming_the_flag(values, message):
    with pytest.raises(ConfigError, match=message):
        BenchmarkConfig(**{"out": "o", "models": ("m.onnx",), **values})


def test_the_reference_batch_is_8_when_measured_else_the_largest():
    assert BenchmarkConfig(out="o", models=("m",), batch_sizes=(1, 8, 32)).reference_batch == 8
    assert BenchmarkConfig(out="o", models=("m",), batch_sizes=(1, 4, 16)).reference_batch == 16


def test_derived_paths_and_batches():
    assert GpuCheckConfig(runs="runs/x").out_dir == Path("runs/x/gpu-check")
    assert GpuCheckConfig(runs="runs/x", out="elsewhere").out_dir == Path("elsewhere")
    search = SearchConfig(teacher="t.pth", out="study")
    assert search.storage_url == f"sqlite:///{(Path('study') / 'study.db').resolve()}"
    assert SearchConfig(teacher="t.pth", storage="postgresql://h/db").storage_url == "postgresql://h/db"
    assert (search.timed_batch, SearchConfig(teacher="t.pth", objective="latency").timed_batch) == (8, 1)
