"""A broken model (NaN weights, as a diverged run leaves them) is stopped at every gate, through the CLI as a user
runs it: export refuses it, infer and serve refuse to answer with NaN, and the tolerances that would switch the
export check off are refused. A model with large logits passes the export check, whose tolerance grows with them."""

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
    """Logits a thousand times larger (a model trained hotter has them): float32 rounding grows with them, top-1
    stays; --rtol's share of the limit lets such a model through, an absolute --atol alone would not."""
    from optimize.checkpoint import load_checkpoint
    from optimize.export import ExportError, export_onnx, verify_onnx

    class Hot(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) * 1000.0

    model = Hot(load_checkpoint(trained).model).eval()
    images = torch.randn(16, 3, 16, 16)
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
