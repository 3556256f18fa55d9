"""export: ONNX with a symbolic batch axis, verified against PyTorch, with its metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from conftest import error_line, run_cli
from optimize import export
from optimize.checkpoint import load_checkpoint


def _export(model, out, *args):
    proc = run_cli("-q", "export", "--model", model, "--out", out, "--json", *args, check=True)
    return json.loads(proc.stdout)


def test_export_has_a_named_batch_axis_metadata_and_verification(trained, tmp_path):
    out = tmp_path / "model.onnx"
    result = _export(trained, out, "--torchscript")
    proto = onnx.load(str(out))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 16, 16]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["edgeopt.class_names"])[9] == "Ankle boot"
    assert props["edgeopt.image_size"] == "16"
    assert props["edgeopt.source_sha256"] == load_checkpoint(trained).sha256
    manifest = json.loads((tmp_path / "model.onnx.json").read_text())
    # the torch.export-based exporter wrote it, converted down to the opset asked for, pooling as before
    assert manifest["exporter"] == {"name": "dynamo", "fallback_reason": None}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [manifest["opset"]] == [17]
    ops = {n.op_type for n in proto.graph.node}
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces with this machine's paths
    batches = manifest["metrics"]["verification"]["batches"]
    assert set(batches) == {"1", "7", "32"}
    assert all(b["top1_agreement"] == 1.0 and b["max_abs_diff"] <= 1e-3 for b in batches.values())
    assert result["metrics"] == manifest["metrics"]

    # a batch size never seen at export time runs, and matches PyTorch
    model = load_checkpoint(trained).model
    x = torch.randn(5, 3, 16, 16)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-3)
    scripted = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    torch.testing.assert_close(scripted(x), model(x))


def test_export_falls_back_to_the_torchscript_exporter_and_says_so(trained, tmp_path, monkeypatch, caplog):
    """Where the torch.export-based exporter fails, the deprecated one writes the same contract; the manifest and a
    warning say why."""
    def fails(*args, **kwargs):
        raise RuntimeError("an op torch.export cannot capture\nand more lines")

    monkeypatch.setattr(export, "_dynamo_graph", fails)
    out = tmp_path / "model.onnx"
    export.run(export.ExportConfig(model=str(trained), out=str(out)))
    manifest = json.loads((tmp_path / "model.onnx.json").read_text())
    reason = "RuntimeError: an op torch.export cannot capture"
    assert manifest["exporter"] == {"name": "torchscript", "fallback_reason": reason}
    assert reason in caplog.text and "TorchScript" in caplog.text
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert manifest["metrics"]["verification"]["top1_agreement"] == 1.0
    assert json.loads({p.key: p.value for p in proto.metadata_props}["edgeopt.class_names"])[0] == "T-shirt/top"


def test_export_a_channel_pruned_model(trained, tmp_path):
    pruned = tmp_path / "pruned.pth"
    run_cli("-q", "prune", "--model", trained, "--method", "l1-channel", "--amount", "0.5", "--val-limit", "64",
            "--train-limit", "64", "--out", pruned, check=True)
    out = tmp_path / "pruned.onnx"
    _export(pruned, out)
    conv_shapes = [tuple(i.dims) for i in onnx.load(str(out)).graph.initializer if len(i.dims) == 4]
    assert min(s[0] for s in conv_shapes) < 64  # narrowed layers survived the export


def test_export_refuses_what_it_cannot_verify(trained, tmp_path):
    out = tmp_path / "strict.onnx"
    proc = run_cli("-q", "export", "--model", trained, "--out", out, "--atol", "1e-12", "--rtol", "0")
    assert proc.returncode == 2 and "--atol" in error_line(proc)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_export_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    proc = run_cli("-q", "export", "--model", bad, "--out", tmp_path / "m.onnx")
    assert proc.returncode == 2 and str(bad) in error_line(proc)
    assert not (tmp_path / "m.onnx").exists()
