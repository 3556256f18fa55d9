"""The CLI is built from the stage configs: one default per option, help without torch, flags round-trip."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import cli
from conftest import ROOT
from calib import ranges
from optimize import configs
from optimize.data import default_preprocessing
from optimize.errors import ConfigError
from optimize.options import flag_of

COMMANDS = cli._commands()
# the smallest command line each subcommand accepts (its required options)
REQUIRED = {
    "train": ["--out", "t.pth"], "distill": ["--teacher", "t.pth", "--out", "s.pth"],
    "prune": ["--model", "s.pth", "--out", "p.pth"], "export": ["--model", "p.pth", "--out", "m.onnx"],
    "calibrate": ["--onnx", "m.onnx", "--out", "q.onnx"], "build-engine": ["--onnx", "m.onnx", "--out", "e.onnx"],
    "evaluate": ["--model", "t.pth"], "infer": ["--model", "m.onnx", "a.png"],
    "package": ["--model", "m.onnx", "--out", "dist"], "serve": ["--model", "m.onnx"],
    "benchmark": ["--out", "bench", "--models", "m.onnx"], "gpu-check": [], "pipeline": [],
    "search": ["--teacher", "t.pth"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_defaults_are_the_configs_defaults(command):
    """Parsing only the required flags gives the config a caller would make in code with the same values."""
    args = cli.build_parser().parse_args([command, *REQUIRED[command]])
    made = cli._config(args)
    config_cls = getattr(configs, COMMANDS[command][0])
    required = {f.name: getattr(made, f.name) for f in dataclasses.fields(config_cls)
                if flag_of(f) in REQUIRED[command] or f.metadata.get("positional")}
    if config_cls is configs.PipelineConfig:
        required["overrides"] = made.overrides
    in_code = config_cls(**required)
    assert dataclasses.replace(made, progress=in_code.progress) == in_code if hasattr(made, "progress") \
        else made == in_code


def test_every_config_field_has_a_flag_with_help():
    """A field without a flag would be an option only code can set; every one of them says why."""
    for command, (name, _) in COMMANDS.items():
        config_cls = getattr(configs, name)
        help_text = cli.build_parser()._subparsers._group_actions[0].choices[command].format_help()
        for f in dataclasses.fields(config_cls):
            if not f.metadata.get("cli", True) or dataclasses.is_dataclass(f.type) or f.name == "loop":
                continue
            shown = f.name if f.metadata.get("positional") else flag_of(f)
            assert shown in help_text, f"{command}: {f.name} has no flag"
        assert "(default: None)" not in help_text and help_text.count("(default:") >= 1


def test_boolean_options_that_default_on_can_be_turned_off():
    args = cli.build_parser().parse_args(["train", "--out", "t.pth", "--no-amp", "--no-channels-last", "--cpu-bf16"])
    loop = cli._config(args).loop
    assert (loop.amp, loop.channels_last, loop.cpu_bf16) == (False, False, True)


def test_pipeline_flags_become_recipe_overrides():
    args = cli.build_parser().parse_args(["pipeline", "--train-limit", "300", "--device", "cpu"])
    overrides = dict(cli._config(args).overrides)
    assert overrides["train_limit"] == 300 and overrides["device"] == "cpu" and overrides["data"] is None


def test_configs_made_in_code_check_choices_with_the_flags_name():
    with pytest.raises(ConfigError, match=r"--method must be one of l1-unstructured, l1-channel, 2:4 \(got 'l3'\)"):
        configs.PruneConfig(model="s.pth", out="p.pth", method="l3")
    with pytest.raises(ConfigError, match="--target"):
        configs.CalibConfig(onnx="m.onnx", out="q.onnx", target="gpu")


def test_prune_fine_tuning_learning_rate_without_lr_is_the_fine_tuning_default():
    """CLI and recipe alike: no --lr means the fine-tuning default, not the training one."""
    cfg = configs.PruneConfig(model="s.pth", out="p.pth", finetune_epochs=2)
    assert cfg.finetune_loop.lr == configs.FINETUNE_LR["adamw"] and cfg.finetune_loop.epochs == 2
    sgd = configs.PruneConfig(model="s.pth", out="p.pth", loop=configs.LoopConfig(optimizer="sgd", lr=0.3))
    assert sgd.finetune_loop.lr == 0.3


@pytest.mark.parametrize("argv", [["--help"], ["package", "--help"], ["train", "--help"], ["benchmark", "--help"]])
def test_help_imports_no_torch_or_onnx(argv):
    code = ("import runpy, sys\nsys.argv = ['cli.py', *sys.argv[1:]]\n"
            "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'torchvision', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: cli.py" in proc.stdout


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 100.0])
def test_every_accuracy_budget_is_checked_by_one_rule(value):
    from optimize.configs import BenchmarkConfig, PackageConfig, SearchConfig
    from optimize.errors import ConfigError

    for make in (lambda: BenchmarkConfig(out="o", models=("m.onnx",), max_accuracy_drop=value),
                 lambda: PackageConfig(model="m.onnx", out="o", max_accuracy_drop=value),
                 lambda: SearchConfig(teacher="t.pth", out="o", max_accuracy_drop=value)):
        with pytest.raises(ConfigError, match=r"--max-accuracy-drop must be top-1 points in \[0, 100\)"):
            make().check()  # refused when built (Options check their values), or at the latest here


def _help(command: str) -> str:
    """``cli.py COMMAND --help`` as one line (argparse wraps it at the terminal's width)."""
    return " ".join(cli.build_parser()._subparsers._group_actions[0].choices[command].format_help().split())


@pytest.mark.parametrize("optimizer", configs.OPTIMIZERS)
def test_help_states_the_learning_rate_and_weight_decay_the_loop_uses(optimizer):
    """No --lr / --weight-decay: the values --help promises are the ones the training and fine-tuning loops get."""
    loop = configs.LoopConfig(optimizer=optimizer)
    fine_tuning = configs.PruneConfig(model="s.pth", out="p.pth", loop=loop).finetune_loop
    train_help, prune_help = _help("train"), _help("prune")
    assert f"{configs.per_optimizer({optimizer: loop.peak_lr})}" in train_help.split("prune's fine-tuning")[0]
    assert f"fine-tuning: {configs.per_optimizer(configs.FINETUNE_LR)}" in prune_help
    assert configs.per_optimizer({optimizer: fine_tuning.peak_lr}) in prune_help.split("prune's fine-tuning")[1]
    assert configs.per_optimizer({optimizer: loop.decay}) in train_help


def test_help_states_the_data_workers_the_rule_gives():
    """The --workers help reads off the rule: where it gives none, half the cores, and its bounds."""
    few = max(cores for cores in range(1, 65) if configs.default_workers("cpu", cores) == 0)
    cap = max(configs.default_workers(device, cores) for device in ("cpu", "cuda") for cores in range(1, 257))
    assert [configs.default_workers("cuda", cores) for cores in (1, 2, 6)] == [1, 1, 3]
    assert configs.default_workers("cpu", few + 1) == (few + 1) // 2
    assert f"0 when a CPU trains on <= {few} cores, else half the cores, 1 to {cap}" in _help("train")


def test_help_states_the_prune_amount_batch_profile_and_acceptance_set_the_code_uses():
    """The prune target without --amount, package's profile without a recorded one (build-engine's defaults), and
    the acceptance set's size on each side of the PNG/JPEG threshold, as --help says them."""
    assert f"(default: {configs.PruneConfig(model='s.pth', out='p.pth').target:g};" in _help("prune")
    build = configs.BuildConfig(onnx="m.onnx", out="m.ort.onnx")
    package_help = _help("package")
    for side in ("min", "opt", "max"):
        assert f"(default: the engine's profile, else {getattr(build, side + '_batch')})" in package_help
    small, large = configs.acceptance_count(configs.SMALL_IMAGE), configs.acceptance_count(configs.SMALL_IMAGE + 1)
    assert f"(default: {small} up to {configs.SMALL_IMAGE} px, {large} above)" in package_help


def test_help_states_each_data_presets_input_side_and_augmentation(tmp_path):
    """Without --image-size / --augment, train gets the data preset's side and augmentation, as --help says."""
    train_help = _help("train")
    for data, name in ((configs.FASHION_MNIST, "fashion-mnist"), (str(tmp_path), "folders")):
        preset = default_preprocessing(data)
        assert f"{preset.image_size} for {name}" in train_help and f"{preset.train_augment} for {name}" in train_help


def test_calibrate_help_states_the_percentile_and_batches_the_code_uses():
    """The percentile cut --help states is the one calibrate collects with, and calib.ranges' own default (the
    library keeps one, since calib/ may not read optimize/); the cpu target's timed and choosing batches."""
    assert ranges.RangeOptions().percentile == configs.CALIB_PERCENTILE
    assert all(ranges.DEFAULTS[m].percentile == configs.CALIB_PERCENTILE for m in configs.CALIB_METHODS)
    assert configs.CALIB_CHOOSING_BATCH in configs.CALIB_TIMED_BATCHES
    calibrate_help = _help("calibrate")
    assert f"percentile ({configs.CALIB_PERCENTILE:g}th)" in calibrate_help
    batches = " and ".join(map(str, configs.CALIB_TIMED_BATCHES))
    assert f"at batch {batches} (chosen by batch {configs.CALIB_CHOOSING_BATCH})" in calibrate_help
