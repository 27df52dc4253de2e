"""``fastdiff serve``: an HTTP sampling service on FastAPI + uvicorn around one ContinuousBatcher
(optional extra ``fastdiff[serve]``).

    fastdiff serve --model digits --port 8000
    curl -s 127.0.0.1:8000/sample -d '{"label": 3, "seed": 7, "solver": "dpmpp_2m", "steps": 10}'

Endpoints
---------
POST /sample   body (JSON, every field optional): ``seed`` int in [0, 2**64), ``solver`` (a fastdiff solver name),
               ``steps`` 1..1000, ``label`` (class label, models with labels), ``guidance`` (finite float or null),
               ``format`` "json" | "png" | "raw", ``timeout`` seconds.
               200: json ``{"seed", "solver", "steps", "shape", "sample"}``; png ``image/png``; raw float32
               little-endian bytes with headers ``X-Fastdiff-Shape`` / ``X-Fastdiff-Dtype``.
GET /healthz   the process answers.
GET /readyz    200 when the batcher accepts work, 503 when it is closed, dead or its queue is full.
GET /metrics   Prometheus text: queue depth, batch occupancy, latency histogram, errors by kind.

Every refused request gets a JSON body ``{"error": reason, "detail": [{"field", "message"}]}``: 422 for a bad body
(not JSON, not an object, a bad or unknown field: the field is named), 413 over ``max_body_bytes``, 408 when the
body does not arrive within ``body_timeout`` (a Content-Length larger than the body), 503 when the queue is full
(with Retry-After) or the service is closing, 504 past the request's timeout, 500 when the model failed for this
request (the others are unaffected).  A request whose client disconnects is cancelled and its rows freed.

Concurrent requests share model calls (continuous batching); each result equals sampling that request alone.
"""

import argparse
import asyncio
import importlib
import json
import math
import struct
import time
import zlib
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .batcher import BatcherClosed, ContinuousBatcher, QueueFull

MAX_STEPS = 1000
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class ModelSpec:
    """What the service serves: ``model(x, t, **cond)``, its schedule and prediction, the shape of one sample, and
    its class labels (``label`` goes to the model as ``cond={"label": ...}``; ``null_label`` is the unconditional
    label used with guidance).  ``--model module:callable`` names a function returning one of these."""

    model: object
    schedule: object
    prediction: str
    shape: tuple
    num_labels: int | None = None
    null_label: int | None = None
    default_label: int | None = None
    default_guidance: float | None = None
    name: str = "custom"


def digits_spec() -> ModelSpec:
    """The digits demo UNet (8x8 grayscale digits, labels 0..9, null label 10, guidance 2 by default)."""
    from ..models import digits

    return ModelSpec(digits.pretrained_unet(), digits.schedule(), digits.PREDICTION, (1, 8, 8), num_labels=10,
                     null_label=10, default_label=0, default_guidance=2.0, name="digits")


def gmm_spec() -> ModelSpec:
    """An exact Gaussian-mixture denoiser on EDM (no labels; fast, batch invariant: for tests and load tests)."""
    from .. import schedules
    from ..models import GaussianMixture

    sch = schedules.EDM()
    return ModelSpec(GaussianMixture([-1.0, 2.0], [0.3, 0.5]).model(sch, "epsilon"), sch, "epsilon", (1, 8, 8),
                     name="gmm")


def load_spec(name: str) -> ModelSpec:
    """``digits``, ``gmm`` or ``module:callable`` (a function with no arguments returning a ModelSpec)."""
    if isinstance(name, ModelSpec):
        return name
    if name == "digits":
        return digits_spec()
    if name == "gmm":
        return gmm_spec()
    if ":" not in name:
        raise ValueError(f"--model {name!r}: give 'digits', 'gmm' or 'module:callable' (a function returning a "
                         "fastdiff.serving.http.ModelSpec)")
    module, _, attr = name.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    spec = fn()
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"--model {name!r} returned {type(spec).__name__}, not a fastdiff.serving.http.ModelSpec")
    return spec


def _request_model():
    """The pydantic schema of POST /sample (built lazily: pydantic is an optional dependency)."""
    from pydantic import BaseModel, ConfigDict, Field

    class SampleRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        seed: int = Field(0, ge=0, lt=2**64)
        solver: str = Field("dpmpp_2m", min_length=1, max_length=64)
        steps: int = Field(10, ge=1, le=MAX_STEPS)
        label: int | None = Field(None, ge=0)
        guidance: float | None = Field(None, allow_inf_nan=False, ge=-1000.0, le=1000.0)
        format: Literal["json", "png", "raw"] = "json"
        timeout: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False)

    return SampleRequest


class Metrics:
    """Counters of the service, rendered in Prometheus' text format (all updates happen on the event loop)."""

    def __init__(self):
        self.requests = {}  # status code -> count
        self.errors = {}  # kind -> count
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def count(self, code: int, kind: str | None = None):
        self.requests[code] = self.requests.get(code, 0) + 1
        if kind is not None:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe(self, seconds: float):
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        self.buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, batcher: ContinuousBatcher | None) -> str:
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value}")

        if batcher is not None:
            st = batcher.stats
            metric("fastdiff_queue_depth", "gauge", "Requests accepted and waiting to start.",
                   [("", batcher.queue_depth())])
            metric("fastdiff_active_requests", "gauge", "Requests sampling now.", [("", batcher.active())])
            metric("fastdiff_unfinished_requests", "gauge", "Accepted requests not finished (bounded by max_queue).",
                   [("", batcher.unfinished())])
            metric("fastdiff_max_queue", "gauge", "The bound on unfinished requests.", [("", batcher.max_queue)])
            metric("fastdiff_model_calls_total", "counter", "Model calls (ticks).", [("", batcher.ticks)])
            metric("fastdiff_batch_rows_total", "counter", "Requests summed over model calls.", [("", st["rows"])])
            occupancy = st["rows"] / batcher.ticks / batcher.max_batch if batcher.ticks else 0.0
            metric("fastdiff_batch_occupancy", "gauge", "Mean requests per model call over max_batch.",
                   [("", f"{occupancy:.6g}")])
            metric("fastdiff_batcher_restarts_total", "counter", "Restarts of the batcher's loop.",
                   [("", st["restarts"])])
            metric("fastdiff_batcher_failures_total", "counter", "Requests failed in the batcher, by exception.",
                   [(f'{{exception="{k}"}}', v) for k, v in sorted(batcher.errors.items())])
        metric("fastdiff_http_requests_total", "counter", "POST /sample answers by status code.",
               [(f'{{code="{c}"}}', v) for c, v in sorted(self.requests.items())])
        metric("fastdiff_http_errors_total", "counter", "Refused or failed POST /sample requests by kind.",
               [(f'{{kind="{k}"}}', v) for k, v in sorted(self.errors.items())])
        lines.append("# HELP fastdiff_request_latency_seconds Latency of answered POST /sample requests.")
        lines.append("# TYPE fastdiff_request_latency_seconds histogram")
        acc = 0
        for b, n in zip(LATENCY_BUCKETS + (math.inf,), self.buckets):
            acc += n
            le = "+Inf" if b == math.inf else f"{b:g}"
            lines.append(f'fastdiff_request_latency_seconds_bucket{{le="{le}"}} {acc}')
        lines.append(f"fastdiff_request_latency_seconds_sum {self.latency_sum:.6f}")
        lines.append(f"fastdiff_request_latency_seconds_count {self.latency_count}")
        return "\n".join(lines) + "\n"


class Service:
    """The model, its batcher and the metrics behind one app; the batcher starts on first use (or at startup)."""

    def __init__(self, model="digits", max_batch=16, max_queue=256, cpu_threads=None, request_timeout=60.0,
                 max_body_bytes=16384, body_timeout=10.0, backend="auto"):
        self.model_name, self.backend = model, backend
        self.max_batch, self.max_queue, self.cpu_threads = max_batch, max_queue, cpu_threads
        self.request_timeout, self.max_body_bytes, self.body_timeout = request_timeout, max_body_bytes, body_timeout
        self.spec: ModelSpec | None = None
        self.batcher: ContinuousBatcher | None = None
        self.metrics = Metrics()

    def start(self) -> ContinuousBatcher:
        if self.batcher is None:
            self.spec = load_spec(self.model_name)
            self.batcher = ContinuousBatcher(self.spec.model, max_batch=self.max_batch, max_queue=self.max_queue,
                                             cpu_threads=self.cpu_threads, backend=self.backend).start()
        return self.batcher

    def close(self, drain: bool = True):
        if self.batcher is not None:
            self.batcher.close(drain=drain)


def _error(status: int, message: str, kind: str, metrics: Metrics, detail=None, headers=None):
    from fastapi.responses import JSONResponse

    metrics.count(status, kind)
    body = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _field_errors(exc) -> list:
    return [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in exc.errors()]


class _BodyTooLarge(Exception):
    pass


async def _read_body(request, limit: int, timeout: float) -> bytes:
    async def read():
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    return await asyncio.wait_for(read(), timeout)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of ``image`` ([H, W] grayscale or [H, W, 3] RGB, uint8)."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    color_type = 0 if img.ndim == 2 else 2
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _image_of(shape) -> bool:
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def _to_png(x: torch.Tensor) -> bytes:
    """A sample in [-1, 1] (C, H, W) or (H, W) as PNG."""
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    return png_bytes(img)


def create_app(model="digits", *, max_batch: int = 16, max_queue: int = 256, cpu_threads: int | None = None,
               request_timeout: float = 60.0, max_body_bytes: int = 16384, body_timeout: float = 10.0,
               backend: str = "auto"):
    """The FastAPI app of ``fastdiff serve``: one batcher per app, started at startup (or on first request).

    ``model``: "digits", "gmm", "module:callable" or a ModelSpec.  ``app.state.service`` holds the Service (its
    ``batcher`` and ``metrics``); close it with ``app.state.service.close()`` when the app is not run by a server
    that sends lifespan events.
    """
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    import fastdiff as fd

    SampleRequest = _request_model()
    service = Service(model, max_batch, max_queue, cpu_threads, request_timeout, max_body_bytes, body_timeout,
                      backend)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.start)
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="fastdiff", lifespan=lifespan)
    app.state.service = service
    metrics = service.metrics

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"error": "invalid request", "detail": _field_errors(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        b = service.batcher
        if b is None or not b.alive():
            return JSONResponse({"status": "not ready", "reason": "the batcher is not running"}, status_code=503)
        if b.unfinished() >= b.max_queue:
            return JSONResponse({"status": "not ready", "reason": "the queue is full"}, status_code=503)
        return {"status": "ready", "queue_depth": b.queue_depth(), "unfinished": b.unfinished()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(service.batcher), media_type="text/plain; version=0.0.4")

    @app.post("/sample", openapi_extra={"requestBody": {"content": {"application/json": {
        "schema": SampleRequest.model_json_schema()}}}})
    async def sample(request: Request):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > service.max_body_bytes):
            if not length.isdigit():
                return _error(400, f"Content-Length {length!r} is not a number", "bad_request", metrics)
            return _error(413, f"the body has {length} bytes, more than the limit of {service.max_body_bytes}",
                          "body_too_large", metrics)
        try:
            body = await _read_body(request, service.max_body_bytes, service.body_timeout)
        except _BodyTooLarge:
            return _error(413, f"the body is larger than the limit of {service.max_body_bytes} bytes",
                          "body_too_large", metrics)
        except ClientDisconnect:
            return _error(499, "the client disconnected", "disconnected", metrics)
        except asyncio.TimeoutError:
            return _error(408, f"the body did not arrive within {service.body_timeout:g} s (is Content-Length "
                          "right?)", "body_timeout", metrics)
        try:
            obj = json.loads(body) if body.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(422, f"the body is not valid JSON: {e}", "bad_request", metrics,
                          [{"field": "body", "message": str(e)}])
        try:
            req = SampleRequest.model_validate(obj)
        except ValidationError as e:
            detail = _field_errors(e)
            return _error(422, "invalid request: " + "; ".join(f"{d['field']}: {d['message']}" for d in detail),
                          "bad_request", metrics, detail)
        b = service.start()
        spec = service.spec

        def refuse(field, message):
            return _error(422, f"invalid request: {field}: {message}", "bad_request", metrics,
                          [{"field": field, "message": message}])

        if req.format == "png" and not _image_of(spec.shape):
            return refuse("format", f"png needs an image shape (C in 1 or 3, H, W); samples are {spec.shape}")
        cond, uncond = {}, {}
        guidance = req.guidance if "guidance" in req.model_fields_set else spec.default_guidance
        if spec.num_labels is None:
            if req.label is not None:
                return refuse("label", f"model {spec.name!r} takes no label")
            if guidance is not None:
                return refuse("guidance", f"model {spec.name!r} has no labels to guide with")
        else:
            label = req.label if req.label is not None else spec.default_label
            if label is None or label >= spec.num_labels:
                return refuse("label", f"label must be in 0..{spec.num_labels - 1}, got {label}")
            cond = {"label": torch.tensor(label)}
            if guidance is not None:
                uncond = {"label": torch.tensor(spec.null_label)}
        try:
            plan = fd.plan(req.solver, spec.schedule, req.steps, prediction=spec.prediction)
        except (ValueError, TypeError) as e:
            return refuse("solver" if req.solver not in fd.SOLVERS else "steps", str(e))
        timeout = req.timeout or service.request_timeout
        try:
            fut = b.submit(plan, req.seed, spec.shape, cond=cond, uncond=uncond or None, guidance_scale=guidance,
                           timeout=timeout)
        except QueueFull as e:
            return _error(503, str(e), "queue_full", metrics, headers={"Retry-After": "1"})
        except BatcherClosed as e:
            return _error(503, str(e), "closed", metrics)
        except ValueError as e:
            return refuse("body", str(e))
        result = asyncio.wrap_future(fut)
        disconnect = asyncio.ensure_future(request.receive())  # the body is read: the next message is a disconnect
        try:
            # the batcher fails the request at its deadline; the slack covers a model call in progress
            done, _ = await asyncio.wait({result, disconnect}, timeout=timeout + 5.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            fut.cancel()  # no effect once it ended; frees its rows if the client left or this handler was cancelled
            disconnect.cancel()
        if result not in done:
            if disconnect in done:
                return _error(499, "the client disconnected", "disconnected", metrics)
            return _error(504, f"no result within {timeout:g} s", "timeout", metrics)
        if not result.cancelled():
            result.exception()  # retrieved here, so asyncio does not log it; the answer reads fut below
        try:
            x = fut.result()
        except CancelledError:
            return _error(503, "the request was cancelled: the service is closing", "closed", metrics)
        except TimeoutError as e:
            return _error(504, str(e), "timeout", metrics)
        except Exception as e:
            return _error(500, f"sampling failed for this request: {type(e).__name__}: {e}", "model", metrics)
        metrics.count(200)
        metrics.observe(time.perf_counter() - t0)
        if req.format == "png":
            return Response(_to_png(x), media_type="image/png")
        if req.format == "raw":
            data = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
            return Response(data, media_type="application/octet-stream", headers={
                "X-Fastdiff-Shape": ",".join(map(str, x.shape)), "X-Fastdiff-Dtype": "float32"})
        return {"seed": req.seed, "solver": req.solver, "steps": req.steps, "shape": list(x.shape),
                "sample": x.detach().cpu().tolist()}

    return app


def build_parser(prog: str = "fastdiff serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="HTTP sampling service (FastAPI + uvicorn) on a continuous "
                                 "batcher: POST /sample, GET /healthz /readyz /metrics")
    ap.add_argument("--model", default="digits", help="digits, gmm or module:callable returning a ModelSpec")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16, help="requests per model call at most")
    ap.add_argument("--max-queue", type=int, default=256, help="unfinished requests at most; beyond: 503")
    ap.add_argument("--cpu-threads", type=int, default=None, help="intra-op threads of the batcher's thread")
    ap.add_argument("--request-timeout", type=float, default=60.0, help="default per-request timeout, seconds")
    ap.add_argument("--max-body-bytes", type=int, default=16384)
    ap.add_argument("--backend", default="auto", help="step backend: auto, torch, cpu, triton, cuda")
    ap.add_argument("--log-level", default="warning")
    return ap


def main(argv=None) -> int:
    """Run ``fastdiff serve`` (``argv`` without the subcommand)."""
    import uvicorn

    args = build_parser().parse_args(argv)
    app = create_app(args.model, max_batch=args.max_batch, max_queue=args.max_queue, cpu_threads=args.cpu_threads,
                     request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes, backend=args.backend)
    print(f"fastdiff serve: model {args.model!r} on http://{args.host}:{args.port}/sample", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":  # run the imported module's main, so --model callables see its ModelSpec class
    from fastdiff.serving.http import main as _main

    raise SystemExit(_main())
