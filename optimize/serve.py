"""Stage ``serve``: a small HTTP classification service (FastAPI + uvicorn) around any model ``infer`` runs.

Endpoints:
    ``POST /predict``: one or several images as ``multipart/form-data`` files (any field name), or one image as
        the raw body with an ``image/*`` content type; ``?top_k=N``. Answers
        ``{"predictions": [{"file", "top_k": [{"index", "class", "probability"}]}]}`` in upload order.
    ``GET /health``: ``{"status": "ok"}`` and counters (requests, images, batches, largest batch).
    ``GET /metadata``: classes, preprocessing, backend, precision, the model's sha256, limits.

Concurrent requests are batched (:class:`MicroBatcher`): images wait in a queue at most ``max_wait_ms`` for
others, up to the model's largest batch, and one inference runs at a time in a worker thread, so the event loop
keeps accepting and decoding uploads meanwhile. Bad uploads get a 4xx with a message: 413 (body too large; image
above --max-pixels or Pillow's decompression-bomb limit, or with an aspect ratio above 50:1), 415 (not an image
content type), 400 (not a decodable image), 422 (no image); a full queue gets 503. A connection that sends no data
for ``timeout_s`` while its request is incomplete (slow headers or body) is closed; a client that goes away
mid-upload is logged on one line.

Example::

    app = create_app(ServeConfig(model="runs/model.onnx"))   # what tests mount; run(cfg) serves it with uvicorn
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``Request``, imported
# inside the functions that add the endpoints, so that FastAPI stays optional) at definition time.
import asyncio
import contextlib
import importlib.util
import io
import logging
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from PIL import Image

from .artifacts import sha256_file
from .configs import ServeConfig
from .errors import EdgeoptError, NonFiniteOutputError, RequestError, ServeError
from .infer import image_tensor, model_inputs, top_k
from .preprocess import Preprocessing, check_image_size
from .runners import open_runner

logger = logging.getLogger(__name__)

INSTALL_HINT = "serve needs FastAPI, uvicorn and python-multipart: pip install 'edgeopt[serve]'"
RAW_TYPES = ("application/octet-stream",)


class MicroBatcher:
    """Batch single images from concurrent requests into one inference call at a time.

    Args:
        infer: ``float32 [n, ...] -> [n, classes]``; runs in ``worker``, never twice at once.
        worker: a one-thread executor: give the one the model was opened in (a TensorRT runner's stream and
            buffers belong to it; with pycuda, so does the pushed primary context). The caller shuts it down.
        max_batch: most images per call.
        max_wait_s: how long the first image of a batch waits for more.
        max_queue: most images waiting; :meth:`submit` raises a 503 :class:`RequestError` beyond.

    Example::

        worker = ThreadPoolExecutor(1)
        runner = worker.submit(open_runner, "runs/model.engine", device="cuda").result()
        batcher = MicroBatcher(runner.infer, worker=worker, max_batch=32, max_wait_s=0.005)
        await batcher.start()
        logits = await batcher.submit(images)    # from any number of concurrent tasks
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, worker: ThreadPoolExecutor, max_batch: int,
                 max_wait_s: float, max_queue: int = 1024):
        self._infer, self._worker, self.max_batch, self.max_wait_s = infer, worker, max_batch, max_wait_s
        self._queue: asyncio.Queue | None = None
        self._max_queue = max_queue
        self._task: asyncio.Task | None = None
        self.stats = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0}

    async def start(self) -> None:
        self._queue = asyncio.Queue(self._max_queue)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RequestError(503, "the service is shutting down"))

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Logits of ``images`` (``[k, ...]``), inferred together with whatever else is waiting."""
        if self._queue is None:
            raise ServeError("the batcher is not started")
        if self._queue.qsize() + len(images) > self._max_queue:
            raise RequestError(503, f"{self._queue.qsize()} images are waiting already; retry shortly")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self._queue.put_nowait((image, future))
        self.stats["requests"] += 1
        return np.stack(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        items = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(items) < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            else:
                items.append(self._queue.get_nowait())
        return [(x, f) for x, f in items if not f.done()]  # a request that went away is not inferred

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._next_batch()
            if not items:
                continue
            try:
                logits = await loop.run_in_executor(self._worker, self._infer, np.stack([x for x, _ in items]))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, which reports it
                logger.exception("inference failed")
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), row in zip(items, logits):
                if not future.done():
                    future.set_result(row)
            self.stats["images"] += len(items)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))


def require_serve_dependencies() -> None:
    """Raise :class:`ServeError` with the install command when FastAPI, uvicorn or python-multipart is absent."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        raise ServeError(f"{INSTALL_HINT} ({', '.join(missing)} missing)")


def _limited(receive: Callable, limit: int) -> Callable:
    """An ASGI ``receive`` that refuses a request body growing past ``limit`` bytes (413)."""
    received = 0

    async def limited_receive():
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise RequestError(413, f"request body above the limit of {limit} bytes (--max-upload-bytes)")
        return message

    return limited_receive


def _decode(name: str, data: bytes, transform: Callable, max_pixels: int) -> np.ndarray:
    """One upload to the model's input tensor, or a :class:`RequestError` saying what is wrong with it."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as e:  # the header alone declares more pixels than Pillow decodes
        size = re.search(r"\d+ pixels", str(e))
        raise RequestError(413, f"{name}: {size.group() if size else 'too many pixels'} is above Pillow's "
                                "decompression-bomb limit") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; all mean "not an image"
        raise RequestError(400, f"{name}: not a readable image ({type(e).__name__})") from e
    if width * height > max_pixels:
        raise RequestError(413, f"{name}: {width * height} pixels is above the limit of {max_pixels} (--max-pixels)")
    try:
        check_image_size(width, height)
    except EdgeoptError as e:  # resized by its short side, it would take gigabytes
        raise RequestError(413, f"{name}: {e}") from e
    try:
        return image_tensor(transform, io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - a truncated file opens, then fails to decode
        raise RequestError(400, f"{name}: not a readable image ({type(e).__name__}: {e})") from e


async def _uploads(request, cfg: ServeConfig) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every image in the request, checked for size, content type and count."""
    from starlette.datastructures import UploadFile

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cfg.max_upload_bytes:
        raise RequestError(413, f"request body of {declared} bytes is above the limit of {cfg.max_upload_bytes} "
                                "bytes (--max-upload-bytes)")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        uploads = []
        async with request.form(max_files=cfg.max_images, max_fields=cfg.max_images) as form:
            for _, f in form.multi_items():
                if not isinstance(f, UploadFile):
                    continue
                part_type = (f.content_type or "").split(";")[0].strip().lower()
                if part_type and not (part_type.startswith("image/") or part_type in RAW_TYPES):
                    raise RequestError(415, f"{f.filename}: content type {part_type} is not an image type")
                uploads.append((f.filename or "upload", await f.read()))
    elif content_type.startswith("image/") or content_type in RAW_TYPES:
        uploads = [("body", await request.body())]
    else:
        raise RequestError(415, f"send images as multipart/form-data files or one raw image/* body, not "
                                f"{content_type or 'a body without a content type'}")
    if not uploads:
        raise RequestError(422, "the request holds no image; send one or more files")
    if len(uploads) > cfg.max_images:
        raise RequestError(413, f"{len(uploads)} images in one request; at most {cfg.max_images} (--max-images)")
    return uploads


def _open_model(cfg: ServeConfig) -> tuple[ThreadPoolExecutor, Any, Preprocessing, list[str] | None]:
    """The one-thread worker, the runner of ``cfg.model`` opened in it (a TensorRT runner's stream and buffers
    belong to the thread that made them, so every batch runs there too), its preprocessing and class names. The
    worker is shut down when the model does not open."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="edgeopt-infer")  # opens the model, then runs every batch
    try:
        runner = worker.submit(open_runner, cfg.model, device=cfg.device, threads=cfg.threads,
                               trust=cfg.trust_checkpoint).result()
        preprocessing, class_names = model_inputs(runner)
    except BaseException:
        worker.shutdown()
        raise
    return worker, runner, preprocessing, class_names


def _metadata(cfg: ServeConfig, runner, batcher: MicroBatcher, preprocessing: Preprocessing,
              class_names: list[str] | None) -> dict[str, Any]:
    """What ``GET /metadata`` answers."""
    return {"model": runner.path.name, "sha256": sha256_file(runner.path), "backend": runner.backend,
            "precision": runner.precision, "device": runner.device, "image_size": runner.image_size,
            "class_names": class_names, "preprocessing": preprocessing.to_dict(),
            "max_batch": batcher.max_batch, "limits": {"max_upload_bytes": cfg.max_upload_bytes,
                                                       "max_images": cfg.max_images,
                                                       "max_pixels": cfg.max_pixels}}


def _lifespan(runner, batcher: MicroBatcher, worker: ThreadPoolExecutor) -> Callable:
    """The app's lifespan: the batcher runs while the app serves; at shutdown it stops, then the worker."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        logger.info("serving %s (%s), batches of up to %d", runner.path, runner.label, batcher.max_batch)
        try:
            yield
        finally:
            await batcher.stop()
            worker.shutdown(wait=True)

    return lifespan


def _add_error_handlers(app) -> None:
    """Every failure as JSON ``{"detail": ...}``: a refused request with its status, a model writing non-finite
    logits 500 (logged once), another of our errors 422, anything else 500 naming only the exception's type."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    app.state.non_finite_logged = False

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(NonFiniteOutputError)
    async def _broken_model(request: Request, exc: NonFiniteOutputError):  # the model's fault, not the request's
        if not app.state.non_finite_logged:  # once: every later request would say the same
            logger.error("%s", exc)
            app.state.non_finite_logged = True
        return JSONResponse({"detail": str(exc)}, status_code=500)

    @app.exception_handler(EdgeoptError)
    async def _ours(request: Request, exc: EdgeoptError):  # e.g. the model refusing this input
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug of ours; uvicorn logs the traceback
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


def _add_routes(app, cfg: ServeConfig, batcher: MicroBatcher, metadata: dict[str, Any], transform: Callable,
                class_names: list[str] | None) -> None:
    """``GET /health``, ``GET /metadata`` and ``POST /predict`` (see the module docstring)."""
    from fastapi import Query, Request
    from starlette.requests import ClientDisconnect

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **batcher.stats}

    @app.get("/metadata")
    async def get_metadata() -> dict[str, Any]:
        return metadata

    @app.post("/predict")
    async def predict(request: Request, k: int = Query(cfg.top_k, alias="top_k", ge=1)) -> dict[str, Any]:
        try:
            uploads = await _uploads(Request(request.scope, _limited(request.receive, cfg.max_upload_bytes)), cfg)
        except ClientDisconnect as e:  # nobody to answer: one line in the log, not a traceback
            client = request.client
            logger.info("client %s disconnected mid-upload", f"{client.host}:{client.port}" if client else "?")
            raise RequestError(400, "the client disconnected before the upload was complete") from e
        tensors = await asyncio.gather(*(asyncio.to_thread(_decode, name, data, transform, cfg.max_pixels)
                                         for name, data in uploads))
        logits = await batcher.submit(np.stack(tensors))
        return {"predictions": [{"file": name, "top_k": [s.to_dict() for s in scores]}
                                for (name, _), scores in zip(uploads, top_k(logits, class_names, k))]}


def create_app(cfg: ServeConfig):
    """The FastAPI app serving ``cfg.model`` (opened now, so a bad model fails before listening).

    Raises:
        ServeError: FastAPI, uvicorn or python-multipart is not installed.
        RunnerError: the model cannot be opened.
    """
    require_serve_dependencies()
    from fastapi import FastAPI

    worker, runner, preprocessing, class_names = _open_model(cfg)
    batcher = MicroBatcher(runner.infer, worker=worker, max_wait_s=cfg.max_wait_ms / 1000, max_queue=cfg.max_queue,
                           max_batch=min(cfg.max_batch, runner.max_batch or cfg.max_batch))
    app = FastAPI(title="edgeopt", description=__doc__.split("\n\n")[0],
                  lifespan=_lifespan(runner, batcher, worker))
    app.state.batcher = batcher
    _add_error_handlers(app)
    _add_routes(app, cfg, batcher, _metadata(cfg, runner, batcher, preprocessing, class_names),
                preprocessing.eval_transform(), class_names)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one).

    Raises:
        ServeError: the address cannot be bound (in use, not this machine's).
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from e
    return sock


def timed_protocol(base: type, timeout: float) -> type:
    """``base`` (uvicorn's HTTP protocol class) with a per-connection read timeout.

    uvicorn times out idle keep-alive connections only: a client that sends half its headers, or a body slower
    than it announced, holds a connection (and a buffered upload) forever. This subclass closes a connection when
    ``timeout`` seconds pass without data while a request is incomplete; a complete request that the app is still
    answering is left alone. When nothing was answered yet it first sends ``408 Request Timeout``.
    """

    class TimedProtocol(base):
        def connection_made(self, transport) -> None:
            self._read_timer = None
            super().connection_made(transport)
            self._arm_read_timer()

        def data_received(self, data: bytes) -> None:
            self._arm_read_timer()
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _arm_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(self.timeout, self._read_timed_out)

        def _read_timed_out(self) -> None:
            cycle = self.cycle
            if cycle is not None and not cycle.more_body and not cycle.response_complete:
                return  # the whole request arrived; the app is answering it
            if self.transport.is_closing():
                return
            logger.info("closing the connection of %s: no data for %g s with its request incomplete",
                        "%s:%d" % self.client if self.client else "a client", self.timeout)
            if cycle is None or not cycle.response_started:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    TimedProtocol.timeout = timeout
    TimedProtocol.__name__ = TimedProtocol.__qualname__ = f"Timed{base.__name__}"
    return TimedProtocol


def uvicorn_config(app, cfg: ServeConfig, **options):
    """The ``uvicorn.Config`` :func:`run` serves ``app`` with: uvicorn's HTTP protocol with ``cfg.timeout_s``."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    options = {"log_config": None, "timeout_graceful_shutdown": 10, **options}
    return uvicorn.Config(app, http=timed_protocol(AutoHTTPProtocol, cfg.timeout_s), **options)


def run(cfg: ServeConfig, ready: Callable[[str], None] | None = None) -> None:
    """Serve ``cfg.model`` until interrupted (Ctrl-C or SIGTERM stop it gracefully).

    Args:
        cfg: what to serve, where.
        ready: called with the base URL (``http://127.0.0.1:8000``) once the port is bound.
    """
    require_serve_dependencies()
    import uvicorn

    app = create_app(cfg)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    logger.info("listening on %s", url)
    if ready is not None:
        ready(url)
    server = uvicorn.Server(uvicorn_config(app, cfg))
    server.run(sockets=[sock])
