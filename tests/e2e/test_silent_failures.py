"""Nothing broken passes silently, through the CLI as a user runs it. A broken model (NaN weights, as a diverged run
leaves them) is stopped at every gate: export refuses it, infer and serve refuse to answer with NaN, and the
tolerances that would switch the export check off are refused; a model with large logits passes the export check,
whose tolerance grows with them. Options a stage cannot honour, outputs landing on inputs, files that are not what
they seem and recipes that would fail after minutes of stages are refused up front, in one line."""

from __future__ import annotations

import asyncio
import io
import math

import httpx
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from conftest import error_line, fashion_arrays, run_main
from optimize import serve
from optimize.artifacts import sha256_file


@pytest.fixture(scope="module")
def nan_checkpoint(trained, tmp_path_factory):
    """The tiny trained model with one BatchNorm's running variance NaN (what 'train --lr 1e6' once saved)."""
    payload = torch.load(trained, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("running_var"))
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], math.nan)
    path = tmp_path_factory.mktemp("nan") / "nan.pth"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def nan_onnx(exported_onnx, tmp_path_factory):
    """The exported tiny model with its first conv's weights NaN (export refuses to write one; a user may
    still arrive with one)."""
    model = onnx.load(str(exported_onnx))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weights = next(i for i in model.graph.initializer if i.name == conv.input[1])
    weights.CopyFrom(numpy_helper.from_array(np.full(tuple(weights.dims), np.nan, np.float32), weights.name))
    path = tmp_path_factory.mktemp("nan-onnx") / "nan.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shoe.png"
    Image.fromarray(fashion_arrays("val")[0][0], "L").save(path)
    return path


def test_export_refuses_a_model_with_nan_weights(nan_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    before = sha256_file(nan_checkpoint)
    proc = run_main("-q", "export", "--model", nan_checkpoint, "--out", out)
    line = error_line(proc)
    assert proc.returncode == 2 and "non-finite logits" in line and "lower --lr" in line
    assert not out.exists() and sha256_file(nan_checkpoint) == before


@pytest.mark.parametrize("args, flag", [(["--atol", "nan"], "--atol"), (["--atol", "inf"], "--atol"),
                                        (["--atol", "0"], "--atol"), (["--rtol", "-1"], "--rtol")])
def test_export_refuses_tolerances_that_switch_the_check_off(trained, tmp_path, args, flag):
    proc = run_main("-q", "export", "--model", trained, "--out", tmp_path / "m.onnx", *args)
    assert proc.returncode == 2 and flag in error_line(proc) and not (tmp_path / "m.onnx").exists()


def test_infer_refuses_to_answer_nan(nan_onnx, png):
    proc = run_main("-q", "infer", "--model", nan_onnx, png, "--json")
    assert proc.returncode == 1 and "answered NaN or inf" in error_line(proc)
    assert proc.stdout.strip() == ""  # no JSON with bare NaN in it


def test_serve_answers_500_with_the_reason_and_logs_it_once(nan_onnx, png, caplog):
    app = serve.create_app(serve.ServeConfig(model=str(nan_onnx)))

    async def post_twice():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                data = png.read_bytes()
                return [await client.post("/predict", files=[("file", ("shoe.png", io.BytesIO(data), "image/png"))])
                        for _ in range(2)]

    responses = asyncio.run(post_twice())
    assert [r.status_code for r in responses] == [500, 500]
    assert "answered NaN or inf" in responses[0].json()["detail"]
    assert "probability" not in responses[0].text  # no answer, rather than {"probability": null}
    assert sum("answered NaN or inf" in r.message for r in caplog.records) == 1


def test_the_export_tolerance_grows_with_the_logits(trained, tmp_path):
    """Logits ten thousand times larger (a model trained hotter has them): float32 rounding grows with them, top-1
    stays; --rtol's share of the limit lets such a model through, an absolute --atol alone would not."""
    from optimize.checkpoint import load_checkpoint
    from optimize.export import ExportError, export_onnx, verify_onnx

    class Hot(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) * 10000.0

    model = Hot(load_checkpoint(trained).model).eval()
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "hot.onnx"
    export_onnx(model, images[:1], path)
    passed = verify_onnx(path, model, images, atol=1e-3, rtol=1e-3)
    assert passed["top1_agreement"] == 1.0 and passed["max_abs_diff"] > 1e-3  # beyond an absolute 1e-3
    with pytest.raises(ExportError, match="limit 1.00e-03"):
        verify_onnx(path, model, images, atol=1e-3, rtol=0.0)


@pytest.mark.parametrize("plot", ["{model}", "{model}.json", "{stem}.conv1.png"])
def test_evaluate_plot_never_lands_on_the_model(trained, tmp_path, plot):
    """--plot (and the feature-map PNG written beside it) is an output like --out: not the checkpoint, not its
    manifest."""
    model = tmp_path / "m.pth"
    model.write_bytes(trained.read_bytes())
    (tmp_path / "m.pth.json").write_text((trained.parent / (trained.name + ".json")).read_text())
    target = plot.format(model=model, stem=tmp_path / "m")
    if plot == "{stem}.conv1.png":  # the feature maps of --plot m.png would be m.conv1.png: make that the model
        model = tmp_path / "m.conv1.png"
        model.write_bytes(trained.read_bytes())
        target = str(tmp_path / "m.png")
    before = sha256_file(model)
    proc = run_main("-q", "evaluate", "--model", model, "--val-limit", "32", "--plot", target)
    assert proc.returncode == 2 and "--plot" in error_line(proc) and "destroy" in error_line(proc)
    assert sha256_file(model) == before


@pytest.mark.parametrize("args, message", [
    (["export", "--image-size", "64"], "records 16 px preprocessing"),
    (["infer", "--threads", "-1"], "--threads must be between 1 and"),
    (["infer", "--threads", "100000"], "--threads must be between 1 and"),
    (["evaluate", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["export", "--out", "{tmp}/dir/"], "names a folder"),
])
def test_options_the_stage_cannot_honour_are_refused(trained, png, tmp_path, args, message):
    stage, *rest = args
    rest = [a.format(tmp=tmp_path) for a in rest]
    extra = {"export": ["--out", str(tmp_path / "m.onnx")] if "--out" not in rest else [],
             "infer": [str(png)], "evaluate": ["--val-limit", "32"]}[stage]
    proc = run_main("-q", stage, "--model", trained, *rest, *extra)
    assert proc.returncode == 2 and message in error_line(proc), proc.stderr
    assert not (tmp_path / "dir").exists() and not (tmp_path / "m.onnx").exists()


def test_infer_takes_a_plain_torchvision_state_dict_with_image_size(trained, png, tmp_path):
    """The README's promise: a plain state_dict (no preprocessing recorded) runs with --image-size."""
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(trained, weights_only=True)["state_dict"], plain)
    proc = run_main("-q", "infer", "--model", plain, png)
    assert proc.returncode == 2 and "give --image-size" in error_line(proc)
    proc = run_main("-q", "infer", "--model", plain, png, "--image-size", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(__import__("json").loads(proc.stdout)[0]["top_k"]) == 5


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "is not a PyTorch checkpoint (it starts with"),
    (lambda p: torch.save({"format": "edgeopt-checkpoint", "version": 99}, p), "format version 99"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_checkpoints_that_are_not_what_they_seem_are_named_as_such(tmp_path, make, message):
    path = tmp_path / "m.pth"
    make(path)
    proc = run_main("-q", "evaluate", "--model", path, "--val-limit", "16")
    line = error_line(proc)
    assert proc.returncode == 2 and message in line and "--trust-checkpoint" not in line


def test_a_fifo_is_not_called_missing(tmp_path):
    import os

    fifo = tmp_path / "m.pth"
    os.mkfifo(fifo)
    proc = run_main("-q", "evaluate", "--model", fifo, "--val-limit", "16")
    assert proc.returncode == 2 and "not a regular file" in error_line(proc)


def test_onnx_metadata_naming_other_classes_than_the_graph_is_refused(exported_onnx, png, tmp_path):
    model = onnx.load(str(exported_onnx))
    for prop in model.metadata_props:
        if prop.key == "edgeopt.class_names":
            prop.value = '["a", "b", "c"]'
    path = tmp_path / "three.onnx"
    onnx.save(model, str(path))
    proc = run_main("-q", "infer", "--model", path, png)
    assert proc.returncode == 2 and "names 3 classes but the graph outputs 10" in error_line(proc)


def test_calibrating_an_int8_model_is_refused(exported_onnx, tmp_path):
    int8 = tmp_path / "m.int8.onnx"
    run_main("-q", "calibrate", "--onnx", exported_onnx, "--out", int8, "--target", "tensorrt", "--num-images", "32",
             "--val-limit", "32")
    proc = run_main("-q", "calibrate", "--onnx", int8, "--out", tmp_path / "again.onnx")
    assert proc.returncode == 2 and "already INT8" in error_line(proc)
    proc = run_main("-q", "calibrate", "--onnx", exported_onnx, "--out", tmp_path / "one.onnx", "--num-images", "1",
                    "--target", "tensorrt")
    assert proc.returncode == 2 and "no full batch" in error_line(proc)


def test_benchmark_refuses_batches_no_deployment_uses(trained, tmp_path):
    proc = run_main("-q", "benchmark", "--baseline", trained, "--batch-sizes", "100000", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "--batch-sizes above 4096" in error_line(proc)


def test_a_recipe_number_python_cannot_read_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  teacher:\n    epochs: " + "9" * 5000 + "\n")
    proc = run_main("-q", "pipeline", "--config", recipe, "--out", tmp_path / "runs", "--dry-run")
    assert proc.returncode == 2 and "cannot be read" in error_line(proc)


@pytest.mark.parametrize("recipe, args, message", [
    ("stages:\n  teacher: false\n", [], "'teacher: false' but names no teacher"),
    ("stages:\n  benchmark: {device: cuda}\n", [], "--device cuda"),
    ("data: /nonexistent/photos\n", [], "data folder /nonexistent/photos does not exist"),
])
def test_pipeline_dry_run_refuses_what_the_run_would_fail_on(tmp_path, recipe, args, message):
    if "cuda" in recipe and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    for dry in (["--dry-run"], []):  # the real run refuses it before its first stage, as the dry run does
        proc = run_main("-q", "pipeline", "--preset", "quick", "--config", path, "--out", tmp_path / "runs", *dry)
        assert proc.returncode == 2 and message in error_line(proc), proc.stderr
    assert not (tmp_path / "runs" / "teacher.pth").exists()


def test_a_killed_writers_temporary_file_goes_with_the_next_run(trained, tmp_path):
    """SIGKILL during a write leaves '.m.onnx.pPID.XXXXXXXX.tmp': gone after the next run, however young, once
    its writer is dead; a live writer's file stays."""
    import os

    dead = tmp_path / ".m.onnx.p999999999.abcdefgh.tmp"  # no such pid
    live = tmp_path / f".m.onnx.p{os.getpid()}.abcdefgh.tmp"
    dead.write_bytes(b"")
    live.write_bytes(b"")
    proc = run_main("-q", "export", "--model", trained, "--out", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    assert not dead.exists() and live.exists() and (tmp_path / "m.onnx").is_file()
