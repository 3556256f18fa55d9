"""serve: the HTTP service on loopback, through a real HTTP client."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from conftest import ROOT, fashion_arrays
from optimize import infer, serve
from optimize.artifacts import sha256_file

UPLOAD_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    pixels, _ = fashion_arrays("val")
    out = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(pixels[i], "L").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def server(exported_onnx):
    """The app of ``cli.py serve`` in a uvicorn thread on 127.0.0.1 (any free port); yields (base URL, app)."""
    app = serve.create_app(serve.ServeConfig(model=str(exported_onnx), max_upload_bytes=UPLOAD_LIMIT, max_images=8))
    sock = serve.bind("127.0.0.1", 0)
    runner = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    runner.should_exit = True
    thread.join(timeout=30)


def files(*pngs: bytes, content_type: str = "image/png") -> list:
    return [("file", (f"{i}.png", data, content_type)) for i, data in enumerate(pngs)]


def test_health_and_metadata(server, exported_onnx):
    base, _ = server
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    meta = httpx.get(f"{base}/metadata").json()
    assert (meta["backend"], meta["precision"], meta["image_size"]) == ("onnxruntime", "fp32", 16)
    assert meta["sha256"] == sha256_file(exported_onnx) and meta["class_names"][9] == "Ankle boot"
    assert meta["preprocessing"]["resize_size"] == 16


def test_predict_one_and_several_images_as_infer_does(server, exported_onnx, pngs, tmp_path):
    base, _ = server
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, data in zip(paths, pngs):
        path.write_bytes(data)
    expected = infer.run(infer.InferConfig(model=str(exported_onnx), images=tuple(map(str, paths)), top_k=3))

    one = httpx.post(f"{base}/predict", files=files(pngs[0]), params={"top_k": 3})
    three = httpx.post(f"{base}/predict", files=files(*pngs), params={"top_k": 3})
    raw = httpx.post(f"{base}/predict", content=pngs[0], headers={"content-type": "image/png"})
    assert one.status_code == three.status_code == raw.status_code == 200
    assert [p["file"] for p in three.json()["predictions"]] == ["0.png", "1.png", "2.png"]
    assert len(raw.json()["predictions"][0]["top_k"]) == 5  # the service's default --top-k
    for got, want in zip(one.json()["predictions"] + three.json()["predictions"], expected[:1] + expected):
        assert [c["index"] for c in got["top_k"]] == [c.index for c in want.top_k]
        np.testing.assert_allclose([c["probability"] for c in got["top_k"]],
                                   [c.probability for c in want.top_k], atol=1e-5)


@pytest.mark.parametrize("request_kwargs, status, message", [
    (dict(files=files(b"just some words\n", content_type="text/plain")), 415, "not an image type"),
    (dict(files=files(b"\x89PNG\r\n\x1a\n truncated")), 400, "not a readable image"),
    (dict(files=files(b"\x00" * (UPLOAD_LIMIT + 1))), 413, "--max-upload-bytes"),
    (dict(content=(b"\x00" * 1024 for _ in range(UPLOAD_LIMIT // 1024 + 1)),  # chunked: no Content-Length
          headers={"content-type": "image/png"}), 413, "--max-upload-bytes"),
    (dict(json={"image": "base64?"}), 415, "multipart/form-data"),
    (dict(files=files(*[b"x"] * 9)), 400, "Too many files"),
    (dict(params={"top_k": 0}, content=b"x", headers={"content-type": "image/png"}), 422, "greater than or equal"),
])
def test_bad_uploads_get_a_4xx_with_a_message(server, request_kwargs, status, message):
    base, _ = server
    response = httpx.post(f"{base}/predict", **request_kwargs)
    assert response.status_code == status and message in str(response.json()["detail"]), response.text


def test_missing_fastapi_is_an_install_hint(monkeypatch, exported_onnx):
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None if name == "fastapi" else real(name))
    with pytest.raises(serve.ServeError, match=re.escape("pip install 'edgeopt[serve]'")):
        serve.create_app(serve.ServeConfig(model=str(exported_onnx)))


def flood(base: str, png: bytes, count: int) -> list[httpx.Response]:
    """``count`` concurrent POST /predict, over at most 50 connections."""
    async def send_all():
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict", files=files(png)) for _ in range(count)))

    return asyncio.run(send_all())


def test_cli_serve_batches_200_concurrent_requests_and_stops_on_ctrl_c(exported_onnx, pngs):
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "-q", "serve", "--model", str(exported_onnx),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT ...", once the port is bound
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line + proc.stderr.read() if proc.poll() is not None else line
        responses = flood(url.group(), pngs[0], 200)
        assert [r.status_code for r in responses] == [200] * 200
        assert len({r.json()["predictions"][0]["top_k"][0]["class"] for r in responses}) == 1  # same image, class
        stats = httpx.get(f"{url.group()}/health").json()
        assert stats["images"] == 200 and stats["batches"] < 200 and stats["largest_batch"] > 1, stats
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
