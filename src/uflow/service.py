"""``uflow serve``: the inspection station's HTTP service, a way in above the engine.

A camera PC or a PLC gateway posts one image per part and needs "good or
defective, and where" within a cycle time. :func:`create_app` wraps a loaded
model (a run folder's :class:`~uflow.model.UFlowModel` or an exported
:class:`~uflow.onnx_model.OnnxModel`) in a FastAPI app:

* ``POST /predict`` scores the multipart field ``image`` and answers what
  ``uflow predict`` writes to results.json for it (score, label, regions),
  plus the mask and overlay PNGs (base64) on request;
* ``GET /health``, ``GET /model`` (backbone, size, the verified false-alarm
  promise), ``GET /metrics`` (Prometheus) and ``GET /``, a page a person uses.

One thread owns the model (PyTorch and onnxruntime are not called from many
threads at once): requests queue their decoded images and that thread scores
what has arrived within ``max_wait_ms`` as one batch, so throughput under load
approaches the batch path while a lone request waits at most that long.
Decoding and PNG encoding run in the request threads, beside the model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import __version__
from .calibration import Calibration
from .errors import UFlowError
from .images import read_image
from .result import Prediction
from . import visualize

log = logging.getLogger("uflow.service")

MAX_BODY_BYTES = 32 * 1024 * 1024  # a 24-megapixel PNG is about 20 MB
MAX_PIXELS = 40_000_000  # decoded as float32 RGB that is 480 MB: the largest image one request may hold
MAX_BATCH = 16
MAX_WAIT_MS = 10.0
_ROUTES = ("/", "/predict", "/model", "/health", "/metrics")  # metric labels; anything else counts as "other"


class ServableModel(Protocol):
    """What the service needs of a model: both engines have it."""

    backbone: str
    image_size: int
    calibration: Calibration

    def predict(self, images: list[np.ndarray], *, batch_size: int, keep_images: bool) -> list[Prediction]: ...


class _RequestError(HTTPException):
    """A bad request, answered with its status and ``{"error": message}``."""


@dataclass
class _Job:
    image: np.ndarray
    done: Future  # -> (Prediction, size of the batch it was scored in)


class BatchScorer:
    """The one thread that calls the model: it scores queued images together, in batches of up to ``max_batch``.

    After the first image of a batch arrives it takes what else is queued and
    waits, at most ``max_wait_s``, only while other images are on their way
    (announced with :meth:`expect`: requests still uploading or decoding), so
    a lone request is scored at once. Every submitted image gets an answer: when a batch fails, its
    images are scored one by one, so one bad image only fails its own request.
    :meth:`stop` lets the thread finish everything queued before it exits.
    """

    def __init__(self, model: ServableModel, max_batch: int, max_wait_s: float, on_batch: Callable[[int], None] = lambda n: None):
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="uflow-scorer", daemon=True)
        self._accepting = False
        self._coming = 0  # images announced and not yet submitted; changed only by the event loop's thread

    def start(self) -> None:
        """Score one blank image (the first call of a model is slow), then start the thread."""
        side = self.model.image_size
        self.model.predict([np.full((side, side, 3), 0.5, dtype=np.float32)], batch_size=1, keep_images=False)
        self._accepting = True
        self._thread.start()

    def stop(self) -> None:
        """Refuse new images, finish the queued ones, and end the thread."""
        self._accepting = False
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @contextmanager
    def expect(self) -> Iterator[None]:
        """Announce an image that will be submitted (or given up) before the block ends, so a batch may wait for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    def submit(self, image: np.ndarray) -> Future:
        if not self._accepting:
            raise _RequestError(503, "the server is shutting down")
        job = _Job(image, Future())
        self._queue.put(job)
        return job.done

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if self._coming == 0 or remaining <= 0:
                        break
                    try:
                        job = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            # A request whose client went away has cancelled its future; it is not scored.
            self._score([job for job in batch if job.done.set_running_or_notify_cancel()])

    def _score(self, batch: list[_Job]) -> None:
        if not batch:
            return
        try:
            predictions = self.model.predict([job.image for job in batch], batch_size=len(batch), keep_images=True)
        except Exception as exc:  # noqa: BLE001 - one image's problem must not fail the others: score them alone
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            for job in batch:
                self._score_alone(job)
            return
        self._on_batch(len(batch))
        for job, pred in zip(batch, predictions):
            job.done.set_result((pred, len(batch)))

    def _score_alone(self, job: _Job) -> None:
        try:
            [pred] = self.model.predict([job.image], batch_size=1, keep_images=True)
        except Exception as exc:  # noqa: BLE001
            self._fail(job, exc)
            return
        self._on_batch(1)
        job.done.set_result((pred, 1))

    @staticmethod
    def _fail(job: _Job, exc: Exception) -> None:
        if not isinstance(exc, UFlowError):
            log.error("scoring failed: %r", exc)
        job.done.set_exception(exc)


class _Metrics:
    """The service's Prometheus metrics, in a registry of their own (two apps in one process never share counts)."""

    def __init__(self, depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("uflow_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "uflow_request_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.in_progress = Gauge("uflow_requests_in_progress", "Requests received and not yet answered, by route", ["route"], registry=self.registry)
        self.images = Counter("uflow_images", "Images scored, by label (anomalous = flagged)", ["label"], registry=self.registry)
        self.batch_size = Histogram(
            "uflow_batch_size", "Images scored together in one model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )
        self.queue = Gauge("uflow_queue_images", "Images waiting for the model", registry=self.registry)
        self.queue.set_function(depth)


def _png_base64(picture: np.ndarray) -> str:
    return base64.b64encode(visualize.png_bytes(picture)).decode("ascii")


def _decode(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The upload as float RGB, refusing images over ``max_pixels`` from their header, before decoding them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - read_image below names what is wrong
        width = height = 0
    if width * height > max_pixels:
        raise _RequestError(413, f"{name}: image is {width}x{height} pixels, more than this server's limit of {max_pixels}")
    try:
        return read_image(data, name=name)
    except UFlowError as exc:
        raise _RequestError(422, str(exc)) from None


def _answer(pred: Prediction, name: str, batch: int, display: tuple[float, float], with_mask: bool, with_overlay: bool) -> dict[str, Any]:
    """The image's row as in results.json (its ``path`` is the uploaded file's name), the batch it shared, the PNGs asked for."""
    row = pred.summary()
    row.update(path=name, width=int(pred.anomaly_map.shape[1]), height=int(pred.anomaly_map.shape[0]), batch_size=batch)
    if with_mask:
        row["mask"] = _png_base64(pred.mask.astype(np.uint8) * 255)  # the service always segments, so there is a mask
    if with_overlay:
        row["overlay"] = _png_base64(visualize.overlay(pred.image, pred.anomaly_map, *display, pred.mask))
    return row


class _BodyLimit:
    """Refuses bodies over ``max_bytes``: by their Content-Length at once, and while reading them when it is absent or lies."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": self._message()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _RequestError(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body is larger than this server's limit of {self.max_bytes} bytes"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def create_app(
    model: ServableModel,
    *,
    source: str = "model",
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_batch: int = MAX_BATCH,
    max_wait_ms: float = MAX_WAIT_MS,
) -> FastAPI:
    """The FastAPI app serving ``model`` (see the module docstring); ``source`` is what ``/model`` and the page call it.

    With ``token``, ``/predict`` and ``/model`` need ``Authorization: Bearer
    TOKEN`` and answer 401 without it; ``/``, ``/health`` and ``/metrics`` stay
    open (the page holds no data, and probes and scrapers rarely carry secrets).
    """
    if max_batch < 1 or max_wait_ms < 0 or max_body_bytes < 1 or max_pixels < 1:
        raise UFlowError("max batch, body size and pixels must be at least 1 and the wait 0 ms or more")
    display = (model.calibration.display_low, model.calibration.display_high)
    metrics = _Metrics(lambda: scorer.depth)
    scorer = BatchScorer(model, max_batch, max_wait_ms / 1000.0, on_batch=metrics.batch_size.observe)
    page = (resources.files("uflow") / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(scorer.start)
        yield
        await run_in_threadpool(scorer.stop)  # uvicorn has finished the requests in flight; this finishes their images

    app = FastAPI(title="uflow", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN'", {"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def log_and_count(request: Request, call_next: Callable) -> Response:
        started = time.perf_counter()
        route = request.url.path if request.url.path in _ROUTES else "other"
        with metrics.in_progress.labels(route).track_inprogress():
            response = await call_next(request)
        seconds = time.perf_counter() - started
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(seconds)
        detail = getattr(request.state, "log", "")
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        log.info("%s %s %s %d %.1f ms%s", client, request.method, request.url.path, response.status_code, 1000 * seconds, detail)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        request.state.log = f" ({_one_line(exc.detail)})"
        return JSONResponse({"error": _one_line(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors())
        request.state.log = f" ({_one_line(problems)})"
        return JSONResponse({"error": _one_line(problems)}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %r", request.method, request.url.path, exc)
        return JSONResponse({"error": _one_line(f"internal error: {exc!r}")}, status_code=500)

    @app.post("/predict", dependencies=[Depends(require_token)])
    async def predict(request: Request, mask: bool = False, overlay: bool = False) -> dict[str, Any]:
        """Score the multipart field ``image``; ``?mask=true`` / ``?overlay=true`` add those PNGs, base64-encoded."""
        if request.headers.get("content-length") == "0":
            raise _RequestError(400, "empty request body: send the image as the multipart form field 'image'")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise _RequestError(415, "send the image as the multipart form field 'image' (Content-Type multipart/form-data)")
        with scorer.expect():
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                fields = ", ".join(sorted(set(form.keys()))) or "none"
                raise _RequestError(422, f"no file in the multipart form field 'image' (fields sent: {fields})")
            name = upload.filename or "image"
            data = await upload.read()
            image = await run_in_threadpool(_decode, data, name, max_pixels)
        try:
            pred, batch = await asyncio.wrap_future(scorer.submit(image))
        except UFlowError as exc:  # the model refused this image (e.g. not square for mcait)
            raise _RequestError(422, str(exc)) from None
        metrics.images.labels(pred.label).inc()
        request.state.log = f" {name}: {pred.label}, score {pred.score:.4f}, {len(pred.regions)} regions, batch of {batch}"
        return await run_in_threadpool(_answer, pred, name, batch, display, mask, overlay)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """200 while the model is loaded and the scorer runs; says whether a token is needed."""
        return {"status": "ok", "token_required": token is not None}

    @app.get("/model", dependencies=[Depends(require_token)])
    async def describe() -> dict[str, Any]:
        """What the model is and what it promises about false alarms, with the service's limits."""
        promise = model.calibration.promise
        return {
            "model": source,
            "engine": type(model).__name__,
            "backbone": model.backbone,
            "image_size": model.image_size,
            "uflow_version": __version__,
            "promise": promise.to_dict() if promise is not None else None,
            "limits": {"max_body_bytes": max_body_bytes, "max_pixels": max_pixels, "max_batch": max_batch, "max_wait_ms": max_wait_ms},
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def log_config() -> dict[str, Any]:
    """uvicorn's logging with timestamps, and uflow's own logger: one line per request and per event."""
    fmt = "%(asctime)s %(levelname)s %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"format": fmt, "datefmt": "%Y-%m-%d %H:%M:%S"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uflow": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
    }
