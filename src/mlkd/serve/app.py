"""The HTTP application of ``mlkd serve``: a loaded student (or teacher) behind JSON endpoints and one web page.

    GET  /             the page: pick or drop an image, see its labels (and a teacher's detections)
    POST /v1/predict   a student's labels of one or more images, as ``mlkd.load(...).predict`` gives them
    POST /v1/detect    a teacher's detections, as ``mlkd.load(...).detect`` gives them
    GET  /v1/model     what the model is: kind, classes, input, precision, versions, training set
    GET  /healthz      the process is up;  GET /readyz: the model is loaded and warmed up
    GET  /metrics      Prometheus text;    GET /openapi.json: the API's description

Student images are batched across requests (:mod:`mlkd.serve.batcher`); a teacher's run one at a time on the
same runner thread. Refusals are JSON ``{"detail": ..., "field": ...}`` with a 4xx status
(:mod:`mlkd.serve.inputs`); a full queue is 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from importlib import resources
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Query, Request  # the serve extra: this module is imported only to serve
from fastapi.responses import HTMLResponse, JSONResponse, Response

from mlkd.api import DETECTION_SCORE, MAX_DETECTIONS, Classifier, Detector
from mlkd.errors import BadInput, MlkdError
from mlkd.serve.batcher import Batcher, QueueFull
from mlkd.serve.inputs import HTTPError, decode, integer, number, read_request
from mlkd.serve.limits import UploadLimit
from mlkd.serve.metrics import Metrics
from mlkd.utils import checks
from mlkd.version import __version__

ENDPOINTS = ("/v1/predict", "/v1/detect", "/v1/model", "/healthz", "/readyz", "/metrics", "/")
RETRY_AFTER_S = 1
# the request body of /v1/predict and /v1/detect in the OpenAPI description (the handlers read it themselves)
IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Batching and limits (the ``mlkd serve`` options of the same names)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_upload_mb: float = 16.0

    def __post_init__(self) -> None:
        checks.integer(self.max_batch, "max_batch", low=1)
        checks.number(self.max_wait_ms, "max_wait_ms", low=0)
        checks.integer(self.max_queue, "max_queue", low=1)
        checks.number(self.max_upload_mb, "max_upload_mb", low=0, low_open=True)


class Service:
    """The model, its batcher, the metrics and readiness: what the endpoints share."""

    def __init__(self, model: Classifier | Detector, settings: ServeSettings) -> None:
        self.model, self.settings, self.metrics, self.ready = model, settings, Metrics(), False
        self.batcher = Batcher(self._run, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                               observe=self.metrics.batch_size.observe, depth=self.metrics.queue_depth.set)

    def _run(self, images: list[np.ndarray]) -> np.ndarray:
        self.metrics.images.labels("predict").inc(len(images))
        return self.model.probabilities(images, batch_size=len(images))

    async def start(self) -> None:
        """Start batching and warm the model up on one grey image (its first run allocates and tunes)."""
        await self.batcher.start()
        grey = np.full((self.model.image_size, self.model.image_size, 3), 128, np.uint8)
        if isinstance(self.model, Classifier):
            await self.batcher.submit([grey])
        else:
            await self.batcher.call(self.model.detect, grey)
        self.ready = True

    async def predict(self, request: Any) -> dict[str, Any]:
        if not isinstance(self.model, Classifier):
            raise HTTPError(404, "this server runs a teacher (a detector): POST the images to /v1/detect")
        files, options = await read_request(request, "predict", self.settings.max_queue)
        cuts = _cuts(self.model, options)  # options first: a typo is answered before any image is decoded
        arrays = await _decoded(files)
        rows = await self._queued(self.batcher.submit(arrays))
        return {"names": [name for name, _ in files], "predictions": self.model.labels(np.stack(rows), cuts)}

    async def detect(self, request: Any) -> dict[str, Any]:
        if not isinstance(self.model, Detector):
            raise HTTPError(404, "this server runs a student (a classifier): POST the images to /v1/predict")
        files, options = await read_request(request, "detect", self.settings.max_queue)
        settings = _detect_options(options)
        arrays = await _decoded(files)
        out = []
        for rgb in arrays:
            found = await self.batcher.call(self.model.detect, rgb, None, None, *settings)
            self.metrics.images.labels("detect").inc()
            out.append({"image_scores": found["image_scores"], "boxes": found["boxes"].tolist(),
                        "labels": list(found["labels"]), "scores": found["scores"].tolist(),
                        "size": list(rgb.shape[:2])})
        return {"names": [name for name, _ in files], "detections": out}

    async def _queued(self, waiting: Any) -> Any:
        try:
            return await waiting
        except QueueFull as e:
            raise HTTPError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "image_size": self.model.image_size, "mlkd_version": __version__,
                "batching": dataclasses.asdict(self.settings)}


async def _decoded(files: list[tuple[str, bytes]]) -> list[np.ndarray]:
    """The uploaded images decoded in worker threads, in parallel, off the event loop."""
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(None, decode, name, data) for name, data in files)))


def _checked(field: str, check: Any, value: Any) -> Any:
    """``check(value)``, its ``BadInput`` answered as a 422 naming ``field``."""
    try:
        return check(value)
    except BadInput as e:
        raise HTTPError(422, str(e), field=field) from None


def _cuts(model: Classifier, options: dict) -> tuple:
    limits, _ = _checked("threshold", lambda t: model.cuts(threshold=t), number(options, "threshold"))
    _, top_k = _checked("top_k", lambda k: model.cuts(top_k=k), integer(options, "top_k"))
    return limits, top_k


def _detect_options(options: dict) -> tuple[float, int | None]:
    """``score_threshold`` and ``max_detections`` with ``Detector.detect``'s defaults and rules."""
    score = number(options, "score_threshold")
    most = integer(options, "max_detections") if "max_detections" in options else MAX_DETECTIONS
    score = _checked("score_threshold", lambda v: checks.probability(v, "score_threshold"),
                     DETECTION_SCORE if score is None else score)
    return score, _checked("max_detections", lambda v: checks.integer(v, "max_detections", low=1, none="all"), most)


def create_app(model: Classifier | Detector, settings: ServeSettings | None = None) -> Any:
    """The ASGI application serving ``model`` (a :class:`~mlkd.api.Classifier` or :class:`~mlkd.api.Detector`)."""
    settings = settings or ServeSettings()
    service = Service(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.batcher.stop()

    app = FastAPI(title="mlkd", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Multi-label classification (a distilled student) and weakly-supervised detection "
                              "(a WSDDN teacher), served by mlkd.")
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def refused(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(MlkdError)
    async def failed(request: Request, e: MlkdError) -> JSONResponse:  # the model failed (e.g. non-finite output)
        return JSONResponse({"detail": str(e)}, status_code=500)

    @app.post("/v1/predict", openapi_extra=IMAGES_BODY, summary="Labels of images (a student)")
    async def predict(request: Request,
                      top_k: str | None = Query(None, description="only the k best labels (a whole number >= 1)"),
                      threshold: str | None = Query(None, description="only labels at or above it: a number in "
                                                    "[0, 1], a JSON list (one per class) or object (class -> number)")
                      ) -> JSONResponse:  # built here: FastAPI's validation of a returned dict costs per request
        return JSONResponse(await service.predict(request))

    @app.post("/v1/detect", openapi_extra=IMAGES_BODY, summary="Detections in images (a teacher)")
    async def detect(request: Request,
                     score_threshold: str | None = Query(None, description="keep detections scoring at least this "
                                                         "(default 0.05)"),
                     max_detections: str | None = Query(None, description="at most this many per image (100)")
                     ) -> JSONResponse:
        return JSONResponse(await service.detect(request))

    _info_routes(app, service)
    return Counted(UploadLimit(app, int(settings.max_upload_mb * 2**20)), service)


def _info_routes(app: Any, service: Service) -> None:
    """The GET endpoints: the model's description, liveness, readiness, metrics and the page."""
    @app.get("/v1/model", summary="What the model is")
    async def describe() -> dict:
        return service.describe()

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": "ready" if service.ready else "starting"}, 200 if service.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.text(), media_type=service.metrics.content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("mlkd.serve").joinpath("page.html").read_text())


class Counted:
    """ASGI wrapper: every HTTP answer counted in the metrics by endpoint and status, with its latency. Its
    ``service`` is the application's :class:`Service`."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service, self.metrics = app, service, service.metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sent(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            path = scope["path"]
            self.metrics.answered(path if path in ENDPOINTS else "other", status[0], time.perf_counter() - start)
