"""One ASGI app: the HTTP API (FastAPI) at /v1, /healthz and /docs, and the page (Gradio) at /.

`create_app(predictor, settings)` wires a loaded `loomlens.predict.Predictor` (or anything with
its `.predict(...)` / `.info()` interface) to a bounded `Batcher`. The model is reached only
through that object: serve never imports `loomlens.model`.

Nothing from outside is trusted: the API key is checked from the headers before a byte of the
body is read (`KeyGuard`), bodies are counted as they stream in, never buffered whole
(`BodyLimit`), an image is downscaled to `max_side` as it is decoded and its tiles are capped
by the predictor's `max_tiles`, every request has a compute deadline, large requests run in
their own lane (`Batcher`), CORS answers only the origins configured (none: same origin only)
and /docs is served from local files (no CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

import loomlens
from loomlens.events.store import EventStore
from loomlens.serve.batcher import Batcher
from loomlens.serve.errors import InputError
from loomlens.serve.events import events_router
from loomlens.serve.images import (
    DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, decode_base64, decode_image, header_pixels, set_pil_limit,
)
from loomlens.serve.results import prediction_json
from loomlens.serve.tasks import TASKS, TILE_MODES, Options, parse_options, region_pixels

log = logging.getLogger("loomlens.serve")


#: What a browser sends as `Origin`: scheme://host[:port], nothing after it; or * for any.
_ORIGIN = re.compile(r"\*|https?://[^/\s:?#]+(:\d{1,5})?")


@dataclass
class ServeSettings:
    """One deployment's settings (`loomlens serve` flags). `max_side`: longest image side kept
    after decoding (larger ones are downscaled); `large_cost`: model inputs above which a
    request runs in the large lane; `request_timeout_s`: a request's deadline, queue and
    compute; `cors_origins`: other origins whose pages may call the API (none: same origin)."""

    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    max_queue: int = 16
    max_batch: int = 4
    batch_wait_ms: float = 5.0
    max_body_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    large_cost: int = 16
    request_timeout_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    page: bool = True
    examples: int = 4
    examples_dir: str | None = None
    #: The watchers' events database (path or SQLAlchemy URL) for /v1/events and the Line view.
    events_db: str | None = None

    def __post_init__(self) -> None:
        bad = [o for o in self.cors_origins if not _ORIGIN.fullmatch(o)]
        if bad:  # the browser compares origins exactly: a path or a missing scheme never matches
            raise ValueError(f"--cors-origin takes an origin, scheme://host[:port] (e.g. https://line.local:8080) "
                             f"or *, not {', '.join(map(repr, bad))}")
        if self.api_key and not (self.api_key.isascii() and self.api_key.isprintable()):  # "": no key
            # HTTP headers arrive as Latin-1: a key with other characters could never be sent as typed
            raise ValueError("--api-key (or LOOMLENS_API_KEY) must be printable ASCII (letters, digits, punctuation), "
                             "since HTTP headers carry no other characters reliably; e.g. `openssl rand -hex 16`")
        check_host(self.host)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def check_host(host: str) -> None:
    """Raise ValueError naming `--host` and what to give when `host` is no address this machine
    can listen on (a name that does not resolve, a malformed address, another machine's): found
    before the model loads, where uvicorn would fail only after it, in its own bind error."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind) as probe:
            probe.bind(address)  # port 0: any free one, so only the address is tried
    except socket.gaierror as err:
        why = f"does not resolve to an address ({err.strerror})"
    except OSError as err:
        why = f"is not an address of this machine ({err.strerror})"
    else:
        return
    raise ValueError(f"--host {host!r} {why}; give an address of this machine, e.g. 127.0.0.1 (this machine only), "
                     "0.0.0.0 (every network it is on), or its own IP address or host name")


#: Uploads with more pixels than this (a 7000x7000 PNG takes about 1.5 s to decode on one core)
#: are decoded one at a time, so large uploads hold at most one core and normal frames keep the
#: rest (bench/load.py's mixed phase: two such uploads at once took both cores of a 2-core PC).
LARGE_DECODE_PIXELS = 16_000_000


class Service:
    """Validation + queue + result shaping, shared by the API and the page."""

    def __init__(self, predictor, settings: ServeSettings):
        self.predictor = predictor
        self.settings = settings
        self.large_decode = threading.Semaphore(1)
        self.batcher = Batcher(
            self._predict,
            max_queue=settings.max_queue,
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            large_cost=settings.large_cost,
        )
        self.started = time.time()

    def _predict(self, images: list, options: Options, deadline, between) -> list:
        return self.predictor.predict(images, task=options.task, text=options.text, tile=options.tile,
                                      score_threshold=options.score_threshold, deadline=deadline, between=between)

    def prepare(self, data: bytes, task, text, tile, score_threshold):
        """Validate options first (cheap), then decode the image (bounded by the pixel limit,
        downscaled to `max_side`). A region in pixels is checked against the uploaded image's
        size and scaled with it. Returns (image, options, uploaded size, cost in model inputs)."""
        options = parse_options(task, text, tile, score_threshold)
        large = (header_pixels(data) or 0) > LARGE_DECODE_PIXELS
        with self.large_decode if large else contextlib.nullcontext():
            image, size = decode_image(data, self.settings.max_pixels, self.settings.max_side)
        if TASKS[options.task].text == "region":
            pixels = region_pixels(options.text, *size)
            if pixels is not None and image.size != size:
                sx, sy = image.width / size[0], image.height / size[1]
                x1, y1, x2, y2 = pixels
                options = replace(options, text=f"{x1 * sx:g},{y1 * sy:g},{x2 * sx:g},{y2 * sy:g}")
        cost = self.predictor.model_inputs(image.width, image.height, options.tile, options.task)
        return image, options, size, cost

    def _submit(self, image, options: Options, cost: int):
        return self.batcher.submit(image, options, cost, time.monotonic() + self.settings.request_timeout_s)

    @staticmethod
    def _shape(job, size: tuple[int, int]) -> dict:
        prediction = job.future.result()
        if (prediction.width, prediction.height) != size:  # predicted on a downscaled copy
            prediction = prediction.scaled_to(*size)
        result = prediction_json(prediction)
        result["timing_ms"] = {
            "queue": round(1000 * (job.started - job.enqueued), 1),
            "inference": round(1000 * (job.finished - job.started), 1),
        }
        result["batch_size"] = job.batch_size
        return result

    def _timeout(self) -> InputError:
        return InputError(504, "timeout",
                          f"the request needed more than {self.settings.request_timeout_s:g} s (queue and compute; "
                          "server option --request-timeout-s); send a smaller image or tile=off")

    def _predict_error(self, exc: BaseException) -> InputError:
        if isinstance(exc, InputError):
            return exc
        if isinstance(exc, TimeoutError):
            return self._timeout()
        if isinstance(exc, ValueError):  # the predictor refused these options for this image
            return InputError(422, "bad_request", str(exc))
        return InputError(500, "inference_failed", f"the model failed on this request: {exc}")

    def run(self, data: bytes, task, text, tile, score_threshold):
        """Blocking call (the page): returns `(decoded image, Prediction, result dict)`."""
        image, options, size, cost = self.prepare(data, task, text, tile, score_threshold)
        job = self._submit(image, options, cost)
        try:
            job.future.result(timeout=self.settings.request_timeout_s)
        except Exception as exc:
            job.future.cancel()  # a job still waiting is dropped; a running one stops at its deadline
            raise self._predict_error(exc) from None
        return image, job.future.result(), self._shape(job, size)

    async def run_async(self, data: bytes, task, text, tile, score_threshold) -> dict:
        image, options, size, cost = await run_in_threadpool(self.prepare, data, task, text, tile, score_threshold)
        job = self._submit(image, options, cost)
        del image
        answer = asyncio.wrap_future(job.future)
        try:
            await asyncio.wait_for(asyncio.shield(answer), self.settings.request_timeout_s)
        except Exception as exc:
            raise self._predict_error(exc) from None
        finally:
            if not answer.done():  # timed out, or the client went away: its outcome is no one's
                job.future.cancel()  # a job still waiting is dropped; a running one stops at its deadline
                answer.add_done_callback(_unheard)
        return self._shape(job, size)


def _unheard(answer: asyncio.Future) -> None:
    """Take the late outcome of a request already answered (a 504, a client gone): a running
    job fails at its deadline after that, and asyncio would log its exception, unread, as
    "Future exception was never retrieved" with a whole traceback."""
    if not answer.cancelled():
        answer.exception()


async def _send_error(send, err: InputError) -> None:
    """Answer `err` as JSON straight on the ASGI channel and close the connection (the body
    the client is still sending is never read)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def key_error(headers, api_key: str | None) -> InputError | None:
    """None when `api_key` is unset or the request headers carry it (`Authorization: Bearer`
    or `X-API-Key`), else the 401 to answer."""
    if not api_key:
        return None
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given and hmac.compare_digest(given.encode(), api_key.encode()):
        return None
    return InputError(401, "unauthorized",
                      "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                      headers={"WWW-Authenticate": "Bearer"})


class KeyGuard:
    """ASGI wrapper: a request to /v1/* without the API key gets 401 from its headers alone,
    before anything reads its body (an unauthenticated upload costs no memory)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            err = key_error(headers, self.api_key)
            if err is not None:
                return await _send_error(send, err)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI wrapper: refuse request bodies over `max_bytes` with 413.

    A declared `Content-Length` over the limit is refused without reading; otherwise the body
    is counted as the app reads it (nothing is buffered here): past the limit, reading raises
    the 413 `InputError`, which the API answers (and this wrapper, if nothing else did)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> InputError:
        return InputError(413, "body_too_large",
                          f"the request body is larger than {self.max_bytes / 1024 / 1024:g} MB "
                          "(server option --max-body-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    return await _send_error(send, self._error())
        size = 0
        started = False

        async def counted():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    raise self._error()
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, counted, tracked)
        except InputError as err:
            if started:
                raise
            await _send_error(send, err)


class Detection(BaseModel):
    label: str
    score: float | None = Field(description="0..1 from the generation's token probabilities")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the uploaded image")

class PolygonOut(BaseModel):
    label: str
    points: list[list[float]] = Field(description="[[x, y], ...] in pixels")

class PredictResponse(BaseModel):
    task: str
    width: int
    height: int
    detections: list[Detection]
    polygons: list[PolygonOut]
    text: str
    trained: bool = Field(description="False: the model was never fine-tuned for this task")
    tiled: bool = Field(description="True: the frame was cut into tiles for small defects")
    dropped: int = Field(description="malformed parts of the model's answer that were skipped")
    scale: float = Field(description="< 1: the model saw the image downscaled by this factor (server limits "
                         "--max-side, --max-tiles); boxes are still in the uploaded image's pixels")
    answer_probability: float | None = Field(
        None, description="the model's probability that its answer is not empty; for od, that the image holds a "
        "defect (the highest over its tiles): the score to sort frames OK/NG by. null where not measured")
    timing_ms: dict[str, float]
    batch_size: int


def _error_response(err: InputError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _request_body_doc() -> dict:
    fields = {
        "task": {"type": "string", "enum": list(TASKS), "default": "od"},
        "text": {"type": "string", "description": "phrase (grounding, referring segmentation) or "
                 "region (<loc_x1><loc_y1><loc_x2><loc_y2> on 0..999, or x1,y1,x2,y2 pixels)"},
        "tile": {"type": "string", "enum": list(TILE_MODES), "default": "auto"},
        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}, **fields}}},
                "application/json": {"schema": {
                    "type": "object", "required": ["image"],
                    "properties": {"image": {"type": "string", "description":
                                             "base64 image, optionally as a data: URL"}, **fields}}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"},
                               "description": "raw image bytes; options as query parameters"},
            },
        },
    }


def _local_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the files the `swagger-ui-bundle` package ships (served at
    /docs/assets), so the docs render on a line with no internet."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")


def _lifespan(service: Service, events: EventStore | None) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: the service's batcher runs while the app does; `events` (if any) is
    closed after."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.stop()
            if events is not None:
                events.close()

    return lifespan


def _api_app(service: Service, settings: ServeSettings, events: EventStore | None) -> FastAPI:
    """The bare FastAPI app for `service`: its description, lifespan, CORS and local /docs."""
    app = FastAPI(
        title="loomlens",
        version=loomlens.__version__,
        description="Florence-2 fabric-defect detection on the line. `POST /v1/predict` takes an "
        "image (multipart `image` field, JSON with base64 `image`, or raw bytes) and answers "
        "pixel boxes, labels, scores, polygons and text. Errors are JSON "
        "`{\"error\": {\"status\", \"code\", \"message\"}}`.",
        lifespan=_lifespan(service, events),
        docs_url=None,
        redoc_url=None,  # ReDoc would load its script from a CDN; Swagger UI is served locally
    )
    app.state.service = service
    # Same origin only unless configured. Gradio defers its own CORS (which answers any
    # localhost origin with credentials) to this middleware when the parent app has one.
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                       allow_methods=["GET", "POST"], allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    _local_docs(app)
    return app


def validation_message(errors: list[dict]) -> str:
    """FastAPI's validation `errors` as one line a person reads: each field, what it must be and
    what it got (`query limit: Input should be greater than or equal to 1 (got '0')`)."""
    parts = []
    for err in errors:
        where = " ".join(str(p) for p in err.get("loc", ()))
        got = f" (got {err['input']!r})" if isinstance(err.get("input"), str | int | float) else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(parts)[:500] or "the request is not valid"


def _json_errors(app: FastAPI) -> None:
    """Answer `InputError`, request validation errors and HTTP errors on `app` as JSON errors."""

    @app.exception_handler(InputError)
    async def _input_error(_request, exc: InputError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return _error_response(InputError(422, "invalid_request", validation_message(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return _error_response(InputError(exc.status_code, "http_error", str(exc.detail)))


async def _read_form(request: Request) -> tuple[bytes, Mapping[str, Any]]:
    """The image file (field `image` or `file`) and the fields of a form request; raises
    `InputError` for an unreadable form or one without an image file."""
    try:
        form = await request.form(max_files=1, max_fields=16)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(400, "bad_form", f"cannot read the form: {exc}") from None
    upload = form.get("image") or form.get("file")
    if upload is None or isinstance(upload, str):
        raise InputError(422, "missing_image", "the form needs an 'image' file field")
    return await upload.read(), form


async def _read_json(request: Request) -> tuple[bytes, Mapping[str, Any]]:
    """The decoded base64 `image` and the fields of a JSON request; raises `InputError` for a
    body that is not a JSON object."""
    try:
        fields = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise InputError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise InputError(422, "bad_json", "the JSON body must be an object")
    return decode_base64(fields.get("image")), fields


async def _read_request(request: Request) -> tuple[bytes, Mapping[str, Any]]:
    """The image bytes and option fields of a predict request sent as a form, JSON or raw image
    bytes (options as query parameters); raises `InputError` (415) for any other body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data" or ctype == "application/x-www-form-urlencoded":
        return await _read_form(request)
    if ctype.endswith("json"):
        return await _read_json(request)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await request.body(), request.query_params
    raise InputError(415, "unsupported_media_type",
                     "send multipart/form-data (field 'image'), application/json "
                     "(base64 'image') or raw image bytes (image/*)")


def _model_info(predictor, settings: ServeSettings) -> dict[str, Any]:
    """What /v1/model answers: the predictor's info, the tasks and the serve limits (the API key
    only as whether one is set)."""
    info = dict(predictor.info())
    info["tasks"] = list(TASKS)
    info["serve"] = {k: v for k, v in asdict(settings).items()
                     if k in ("max_queue", "max_batch", "batch_wait_ms", "max_body_mb", "max_pixels",
                              "max_side", "large_cost", "request_timeout_s")}
    info["serve"]["api_key"] = bool(settings.api_key)
    return info


def _v1_router(service: Service, predictor, settings: ServeSettings) -> APIRouter:
    """The /v1 API: POST /v1/predict (run through `service`) and GET /v1/model."""
    v1 = APIRouter(prefix="/v1")  # the key is checked before the body by KeyGuard

    @v1.post("/predict", response_model=PredictResponse, openapi_extra=_request_body_doc(),
             summary="Run a Florence-2 task on one image")
    async def predict(request: Request):
        data, fields = await _read_request(request)
        return await service.run_async(data, fields.get("task"), fields.get("text"),
                                       fields.get("tile"), fields.get("score_threshold"))

    @v1.get("/model", summary="The loaded model, its classes and versions")
    def model_info():
        return _model_info(predictor, settings)

    return v1


def _health_check(app: FastAPI, service: Service) -> None:
    """GET /healthz on `app`: 200 while the service's worker runs, else 503, with its queue."""

    @app.get("/healthz", summary="Liveness: the worker runs and the queue has room")
    def healthz():
        stats = service.batcher.stats()
        ok = stats["worker_alive"]
        return JSONResponse({"status": "ok" if ok else "down",
                             "uptime_s": round(time.time() - service.started, 1), "queue": stats},
                            status_code=200 if ok else 503)


def _example_images(settings: ServeSettings) -> tuple[Path, list]:
    """The folder for the page's example frames and the frames made there (none when none are
    asked for or they cannot be made: they never stop the server)."""
    from loomlens.serve.page import example_frames

    folder = Path(settings.examples_dir or Path(tempfile.gettempdir()) / "loomlens-examples")
    try:
        return folder, example_frames(folder, settings.examples) if settings.examples else []
    except Exception as exc:  # examples are a nicety; never stop the server for them
        log.warning("could not make example frames in %s: %s", folder, exc)
        return folder, []


def _mount_page(app: FastAPI, service: Service, settings: ServeSettings, events: EventStore | None) -> None:
    """Mount the Gradio page for `service` at / of `app`, behind the API key as its password
    when one is set."""
    import gradio as gr

    from loomlens.serve.page import CSS, build_page, theme

    folder, examples = _example_images(settings)
    page = build_page(service, examples, events=events)
    page.queue(max_size=settings.max_queue, default_concurrency_limit=settings.max_batch)
    auth = None
    if settings.api_key:
        key = settings.api_key
        auth = lambda _user, password: hmac.compare_digest(password.encode(), key.encode())  # noqa: E731
    gr.mount_gradio_app(
        app, page, path="/",
        server_name=settings.host, server_port=settings.port,
        allowed_paths=[str(folder)] if examples else None,
        max_file_size=settings.max_body_bytes, ssr_mode=False, show_error=True,
        footer_links=["api"], mcp_server=False, theme=theme(), css=CSS,
        auth=auth, auth_message="This server needs its API key as the password (any user name).",
    )
    # Gradio checks that a file handed to an event was uploaded (not any path on this machine,
    # /etc/passwd or /proc/self/cmdline with the database password) only once its Blocks count as
    # launched, which `launch()` sets and `mount_gradio_app` does not: without this, the page's
    # API copied any readable file into its cache and served it back.
    page.has_launched = True


def _unknown_v1_routes(app: FastAPI) -> None:
    """A /v1 path no route takes answers the API's JSON 404 (`no_such_route`), not the page's
    `{"detail": ...}`: the page mounted at / would otherwise take every path left over. A path
    a route takes with other methods (GET /v1/predict) answers 405 (`method_not_allowed`) with
    `Allow`, since "no route" would send its caller looking for another path."""

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def _no_such_route(request: Request, rest: str):
        allowed = sorted(method.upper() for path, methods in app.openapi()["paths"].items()
                         if compile_path(path)[0].match(f"/v1/{rest}") for method in methods)
        if allowed:
            raise InputError(405, "method_not_allowed", f"/v1/{rest} takes {', '.join(allowed)}, not "
                             f"{request.method}; the API's routes and their methods are listed at /docs",
                             headers={"Allow": ", ".join(allowed)})
        raise InputError(404, "no_such_route", f"no route {request.method} /v1/{rest}; the API's routes and their "
                         "methods are listed at /docs")


def create_app(predictor, settings: ServeSettings | None = None):
    """The ASGI application: the API, /docs and the page, wrapped in the key check and the
    body-size limit (the key first: an unauthenticated body is never read)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    settings = settings or ServeSettings()
    set_pil_limit(settings.max_pixels)
    service = Service(predictor, settings)
    events = EventStore(settings.events_db, create=False) if settings.events_db else None
    app = _api_app(service, settings, events)
    _json_errors(app)
    app.include_router(_v1_router(service, predictor, settings))
    app.include_router(events_router(events))
    _health_check(app, service)
    _unknown_v1_routes(app)
    if settings.page:
        _mount_page(app, service, settings, events)
    return KeyGuard(BodyLimit(app, settings.max_body_bytes), settings.api_key)
