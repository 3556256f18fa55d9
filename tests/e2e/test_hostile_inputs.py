"""Hostile and damaged inputs: odd images, fixed-batch and hand-edited models, broken caches, rude clients.

Each case runs what a user runs (the CLI, or the served app over a real socket) and checks for a one-line
error naming the file, or a 4xx, instead of a traceback, a 500 or gigabytes of memory.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
import uvicorn
from PIL import Image

from conftest import fashion_arrays, error_line, run_cli, run_main
from optimize import serve
from optimize.errors import ConfigError
from optimize.runners import open_runner


# -- helpers -------------------------------------------------------------------------------------------------

def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds none (what a decompression bomb's header says)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def png() -> bytes:
    pixels, _ = fashion_arrays("val")
    return png_bytes(pixels[0])


@pytest.fixture(scope="module")
def strip_png() -> bytes:
    """A ~2 KB 1 x 1,000,000 PNG: few pixels, but 16 x 16,000,000 after a short-side resize to 16."""
    return png_bytes(np.zeros((1, 1_000_000), np.uint8))


def fixed_batch_onnx(src: Path, dst: Path, batch: int) -> Path:
    """``src`` with its input's and output's batch axis fixed to ``batch`` (metadata kept)."""
    model = onnx.load(str(src))
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    onnx.save(model, str(dst))
    return dst


def with_props(src: Path, dst: Path, **props: str) -> Path:
    """``src`` with some metadata_props replaced (``edgeopt_preprocessing`` -> ``edgeopt.preprocessing``)."""
    model = onnx.load(str(src))
    values = {p.key: p.value for p in model.metadata_props}
    values.update({k.replace("_", "."): v for k, v in props.items()})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, values)
    onnx.save(model, str(dst))
    return dst


def nhwc_onnx(src: Path, dst: Path) -> Path:
    """A tiny channels-last model ``[n, 16, 16, 3] -> [n, 3]`` carrying ``src``'s metadata."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), h.make_node("GlobalAveragePool", ["t"], ["p"]),
         h.make_node("Flatten", ["p"], ["y"])], "nhwc",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16, 16, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, {p.key: p.value for p in onnx.load(str(src)).metadata_props})
    onnx.save(model, str(dst))
    return dst


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    payload = torch.load(src, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, dst)
    return dst


class Server:
    """The app of ``cli.py serve`` in a uvicorn thread on 127.0.0.1 (any free port), as ``serve.run`` sets it up."""

    def __init__(self, model: Path, **options):
        cfg = serve.ServeConfig(model=str(model), port=0, **options)
        self.app = serve.create_app(cfg)
        self.sock = serve.bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(serve.uvicorn_config(self.app, cfg))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def files(*pngs: bytes) -> list:
    return [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]


# -- 1. images that explode after the resize --------------------------------------------------------------

def test_infer_refuses_an_extreme_aspect_ratio_before_resizing(exported_onnx, strip_png, png, tmp_path):
    (tmp_path / "strip.png").write_bytes(strip_png)
    (tmp_path / "ok.png").write_bytes(png)
    start = time.monotonic()
    proc = run_cli("infer", "--model", exported_onnx, tmp_path / "strip.png", tmp_path / "ok.png", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    strip, ok = json.loads(proc.stdout)
    assert "aspect ratio" in strip["error"] and "1000000x1" in strip["error"], strip
    assert ok["error"] is None and len(ok["top_k"]) == 5
    assert time.monotonic() - start < 60


def test_serve_answers_413_to_extreme_aspect_ratios_and_decompression_bombs(exported_onnx, strip_png, png):
    with Server(exported_onnx) as srv:
        strip = httpx.post(f"{srv.url}/predict", files=files(strip_png))
        bomb = httpx.post(f"{srv.url}/predict", files=files(png_header_only(20_000, 10_000)))
        fine = httpx.post(f"{srv.url}/predict", files=files(png))
    assert strip.status_code == 413 and "aspect ratio" in strip.json()["detail"], strip.text
    assert bomb.status_code == 413 and "200000000 pixels" in bomb.json()["detail"], bomb.text
    assert fine.status_code == 200


# -- 2. a model exported with a fixed batch ---------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_onnx_runner_splits_and_pads_batches(exported_onnx, tmp_path, batch):
    fixed = open_runner(fixed_batch_onnx(exported_onnx, tmp_path / "fixed.onnx", batch), threads=1)
    dynamic = open_runner(exported_onnx, threads=1)
    assert (fixed.fixed_batch, fixed.max_batch, dynamic.fixed_batch) == (batch, batch, None)
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(fixed.infer(x), dynamic.infer(x), rtol=1e-4, atol=1e-4)


def test_infer_classifies_three_images_with_a_batch_1_onnx(exported_onnx, png, tmp_path):
    model = fixed_batch_onnx(exported_onnx, tmp_path / "b1.onnx", 1)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png)
    proc = run_cli("infer", "--model", model, *images, "--json")
    assert proc.returncode == 0, proc.stderr
    fixed = json.loads(proc.stdout)
    assert [len(r["top_k"]) for r in fixed] == [5, 5, 5]
    dynamic = json.loads(run_main("infer", "--model", exported_onnx, *images, "--json").stdout)
    assert [[c["index"] for c in r["top_k"]] for r in fixed] == [[c["index"] for c in r["top_k"]] for r in dynamic]
    np.testing.assert_allclose([[c["probability"] for c in r["top_k"]] for r in fixed],
                               [[c["probability"] for c in r["top_k"]] for r in dynamic], atol=1e-5)


def test_serve_with_a_batch_1_onnx_answers_several_and_concurrent_images(exported_onnx, png, tmp_path):
    model = fixed_batch_onnx(exported_onnx, tmp_path / "b1.onnx", 1)

    async def concurrent(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict", files=files(png)) for _ in range(20)))

    with Server(model) as srv:
        two = httpx.post(f"{srv.url}/predict", files=files(png, png))
        many = asyncio.run(concurrent(srv.url))
    assert two.status_code == 200 and len(two.json()["predictions"]) == 2, two.text
    assert [r.status_code for r in many] == [200] * 20


# -- 3. hand-made or damaged metadata ---------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("stem"), "stem"),
    (lambda c: c.pop("state_dict"), "state_dict"),
    (lambda c: c["preprocessing"].update(image_size="32"), "image_size"),
    (lambda c: c["preprocessing"].update(mean="abc"), "mean"),
    (lambda c: c.update(preprocessing=[16, 16]), "preprocessing"),
])
def test_damaged_edgeopt_checkpoint_is_one_line_naming_it(trained, png, tmp_path, edit, message):
    ckpt = edited_checkpoint(trained, tmp_path / "bad.pth", edit)
    (tmp_path / "x.png").write_bytes(png)
    proc = run_main("infer", "--model", ckpt, tmp_path / "x.png")
    line = error_line(proc)
    assert proc.returncode == 2 and str(ckpt) in line and message in line, line


@pytest.mark.parametrize("command", ["infer", "calibrate", "package", "serve"])
def test_broken_onnx_preprocessing_json_is_one_line_naming_it(exported_onnx, png, tmp_path, command):
    model = with_props(exported_onnx, tmp_path / "bad.onnx", edgeopt_preprocessing="{not json")
    (tmp_path / "x.png").write_bytes(png)
    args = {"infer": ["infer", "--model", model, tmp_path / "x.png"],
            "calibrate": ["calibrate", "--onnx", model, "--out", tmp_path / "q.onnx"],
            "package": ["package", "--model", model, "--out", tmp_path / "bundle"],
            "serve": ["serve", "--model", model, "--port", "0"]}[command]
    proc = run_main(*args)
    line = error_line(proc)
    assert proc.returncode == 2 and str(model) in line and "edgeopt.preprocessing" in line, line


@pytest.mark.parametrize("image_size", [100_000, 32])
def test_onnx_metadata_disagreeing_with_the_graph_is_one_line(exported_onnx, png, tmp_path, image_size):
    pre = json.loads({p.key: p.value for p in onnx.load(str(exported_onnx)).metadata_props}["edgeopt.preprocessing"])
    pre.update(image_size=image_size, resize_size=image_size)
    model = with_props(exported_onnx, tmp_path / "lying.onnx", edgeopt_preprocessing=json.dumps(pre))
    (tmp_path / "x.png").write_bytes(png)
    line = error_line(proc := run_main("infer", "--model", model, tmp_path / "x.png"))
    assert proc.returncode == 2 and str(model) in line and "image_size" in line, line


# -- 4. a damaged calibration cache -----------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x81", b"[1, 2, 3]", b'{"format": "edgeopt-calibration-cache"}'])
def test_damaged_calibration_cache_is_one_line_saying_to_delete_it(exported_onnx, tmp_path, content):
    cache = tmp_path / "model.calib.json"
    cache.write_bytes(content)
    proc = run_main("calibrate", "--onnx", exported_onnx, "--out", tmp_path / "q.onnx", "--cache", cache)
    line = error_line(proc)
    assert proc.returncode == 2 and str(cache) in line and "delete it" in line, line


# -- 5. rude clients ----------------------------------------------------------------------------------------

def test_client_disconnect_mid_upload_logs_one_line(exported_onnx, caplog):
    with caplog.at_level(logging.INFO), Server(exported_onnx) as srv:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", srv.port)) as conn:
                conn.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 50000\r\n"
                             b"content-type: multipart/form-data; boundary=b\r\n\r\n--b\r\ncontent-disposition: "
                             b"form-data; name=file; filename=a.png\r\ncontent-type: image/png\r\n\r\n\x89PNG")
                time.sleep(0.2)
        time.sleep(0.5)
        assert httpx.get(f"{srv.url}/health").status_code == 200
    text = caplog.text
    assert "Traceback" not in text and not any(r.exc_info for r in caplog.records), text
    assert sum("disconnected" in r.getMessage() for r in caplog.records) == 2, text


@pytest.mark.parametrize("request_bytes", [
    b"POST /predict HTTP/1.1\r\nhost: x\r\n",  # headers never finished
    b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 1000\r\n\r\n\x89PNG",  # body
])
def test_slow_clients_are_timed_out(exported_onnx, request_bytes):
    with Server(exported_onnx, timeout_s=0.5) as srv, socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.sendall(request_bytes)
        conn.settimeout(10)
        start = time.monotonic()
        received = b""
        while chunk := conn.recv(4096):
            received += chunk
        assert time.monotonic() - start < 5, received  # closed by the server, not by our 10 s guard
    assert received == b"" or received.startswith(b"HTTP/1.1 408"), received


def test_serve_timeout_must_be_positive(exported_onnx):
    with pytest.raises(ConfigError, match="timeout"):
        serve.ServeConfig(model=str(exported_onnx), timeout_s=0)
    proc = run_main("serve", "--model", exported_onnx, "--timeout", "0")  # the flag reaches the config
    assert proc.returncode == 2 and "timeout" in error_line(proc)


# -- 6. misleading messages ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["infer", "calibrate"])
def test_an_nhwc_onnx_is_refused_saying_nchw(exported_onnx, png, tmp_path, command):
    model = nhwc_onnx(exported_onnx, tmp_path / "nhwc.onnx")
    (tmp_path / "x.png").write_bytes(png)
    args = {"infer": ["infer", "--model", model, tmp_path / "x.png"],
            "calibrate": ["calibrate", "--onnx", model, "--out", tmp_path / "q.onnx"]}[command]
    line = error_line(proc := run_main(*args))
    assert proc.returncode == 2 and str(model) in line and "NCHW" in line and "[n, 3, 16, 16]" in line, line


def test_unknown_arch_in_a_checkpoint_is_not_called_a_flag(trained, png, tmp_path):
    ckpt = edited_checkpoint(trained, tmp_path / "odd.pth", lambda c: c.update(arch="resnet9000"))
    (tmp_path / "x.png").write_bytes(png)
    line = error_line(proc := run_main("infer", "--model", ckpt, tmp_path / "x.png"))
    assert proc.returncode == 2 and "--arch" not in line, line
    assert "records arch 'resnet9000', which this edgeopt does not know" in line and str(ckpt) in line, line


# -- the same two probes against benchmark and the bundle's runner.py ---------------------------------------

def test_benchmark_times_a_batch_1_onnx_at_batch_1_only(exported_onnx, tmp_path):
    fixed = fixed_batch_onnx(exported_onnx, tmp_path / "b1.onnx", 1)
    out = tmp_path / "report"
    proc = run_cli("-q", "benchmark", "--baseline", exported_onnx, "--models", fixed, "--val-limit", "40",
                   "--batch-sizes", "1", "8", "--rounds", "2", "--seconds", "0.05", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows["b1.onnx"]["throughput"]) == {"1"} and rows["b1.onnx"]["val_images"] == 40
    assert rows["b1.onnx"]["agreement"] == 1.0 and rows["b1.onnx"]["e2e_img_per_s"] > 0


def _bundle_runner(exported_onnx, tmp_path):
    bundle = tmp_path / "bundle"
    run_cli("-q", "package", "--model", exported_onnx, "--out", bundle, check=True)
    spec = importlib.util.spec_from_file_location("bundle_runner_probe", bundle / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return bundle, module


def test_bundle_runner_refuses_a_strip_and_runs_a_batch_1_onnx(exported_onnx, strip_png, png, tmp_path):
    bundle, runner = _bundle_runner(exported_onnx, tmp_path)
    (tmp_path / "strip.png").write_bytes(strip_png)
    for k in range(3):
        (tmp_path / f"ok{k}.png").write_bytes(png)
    with pytest.raises(ValueError, match="aspect ratio"):
        runner.load_image(tmp_path / "strip.png")
    spec = json.loads((bundle / "preprocess.json").read_text())
    files = [tmp_path / "strip.png", *(tmp_path / f"ok{k}.png" for k in range(3))]
    dynamic = runner.classify(runner.OnnxModel(exported_onnx), files, spec, ["c"] * 10, 3, 8)
    fixed = runner.OnnxModel(fixed_batch_onnx(exported_onnx, tmp_path / "b2.onnx", 2))
    assert fixed.max_batch == 2
    results = runner.classify(fixed, files, spec, ["c"] * 10, 3, 8)  # batches of 2; the last one padded
    assert "aspect ratio" in results[0]["error"] and all(r["error"] is None for r in results[1:])
    assert [r["top_k"] for r in results] == [r["top_k"] for r in dynamic]
