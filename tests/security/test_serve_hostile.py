"""`loomlens serve` against the uploads of issue #16, in process (the real tiny model through
`loomlens.predict`; no network): an unauthenticated body is never read, a 7000x7000 PNG costs a
bounded number of tiles and is answered in its own pixels, /docs needs no CDN, CORS answers
only the page's own origin unless configured, a large request runs in its own lane."""

from __future__ import annotations

import asyncio
import io
import re
import threading

import pytest
from PIL import Image
from starlette.testclient import TestClient

from loomlens.serve import ServeSettings, create_app
from loomlens.serve.batcher import Batcher
from loomlens.serve.tasks import Options

KEY = "k-hostile-1"
MAX_TILES = 12


@pytest.fixture(scope="module")
def predictor():
    from loomlens.predict import Predictor

    # tile_size given: `tile="auto"` tiles (a bare model trained on no tiles would not)
    return Predictor(model="tiny", max_boxes=2, batch_size=4, max_tiles=MAX_TILES, tile_size=256)


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """The issue's upload: 7000x7000 (49 MP, just under the 50 MP limit), a few hundred kB."""
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (90, 90, 90)).save(buf, "PNG")
    return buf.getvalue()


def _call(app, scope_headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """Send one POST /v1/predict straight to the ASGI app, the body as `chunks` (a streaming
    client); returns (status, body chunks the app read)."""
    read = []
    sent = []

    async def receive():
        if len(read) < len(chunks):
            read.append(chunks[len(read)])
            return {"type": "http.request", "body": read[-1], "more_body": len(read) < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "headers": scope_headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 7860)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], read


def test_unauthenticated_upload_is_refused_before_its_body_is_read(predictor):
    app = create_app(predictor, ServeSettings(page=False, api_key=KEY, max_body_mb=20))
    chunks = [b"x" * 65536] * 300  # 19 MB, streamed
    headers = [(b"content-type", b"multipart/form-data; boundary=zz"), (b"content-length", str(65536 * 300).encode())]
    status, read = _call(app, headers, chunks)
    assert status == 401 and read == []  # not one chunk consumed
    status, read = _call(app, [*headers, (b"authorization", b"Bearer wrong")], chunks)
    assert status == 401 and read == []


def test_a_body_over_the_limit_is_refused_as_it_streams_never_buffered_whole(predictor):
    app = create_app(predictor, ServeSettings(page=False, api_key=KEY, max_body_mb=1))
    chunks = [b"x" * 65536] * 64  # 4 MB, no Content-Length (chunked)
    status, read = _call(app, [(b"content-type", b"image/png"), (b"x-api-key", KEY.encode())], chunks)
    assert status == 413 and len(read) == 17  # stopped at the first chunk past 1 MB


def test_a_7000px_png_is_downscaled_to_the_tile_cap_and_answered_in_its_own_pixels(predictor, big_png, monkeypatch):
    from loomlens.infer import detection

    assert predictor.model_inputs(7000, 7000) <= MAX_TILES
    assert predictor.model_inputs(7000, 7000, tile="off") == 1
    calls, looks, generate = [], [], detection.generate
    monkeypatch.setattr(predictor, "_detect", lambda spec, images, text, after_batch=None, reread_upto=None: calls.append(len(images))
                        or type(predictor)._detect(predictor, spec, images, text, after_batch))
    monkeypatch.setattr(detection, "generate", lambda m, p, images, *a: looks.append(len(images)) or generate(m, p, images, *a))
    app = create_app(predictor, ServeSettings(page=False, api_key=KEY, max_side=3000))
    with TestClient(app) as c:
        r = c.post("/v1/predict", files={"image": ("big.png", big_png)}, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["width"], result["height"]) == (7000, 7000) and result["tiled"]
    assert 0 < result["scale"] < 3000 / 7000  # max_side first, then the tile cap
    assert 1 < sum(calls) <= MAX_TILES and max(looks) <= predictor.batch_size  # the model sees full batches at most
    for d in result["detections"]:
        assert 0 <= d["box"][0] < d["box"][2] <= 7000 and 0 <= d["box"][1] < d["box"][3] <= 7000


def test_docs_render_offline(predictor):
    app = create_app(predictor, ServeSettings(page=False))
    with TestClient(app) as c:
        html = c.get("/docs").text
        assert "swagger" in html.lower()
        assert re.findall(r"https?://", html) == []
        assets = re.findall(r"""['"](/docs/assets/[^'"]+)['"]""", html)
        assert len(assets) >= 2, html  # Swagger UI's script and style, served from here
        for asset in assets:
            assert c.get(asset).status_code == 200, asset
        assert c.get("/redoc").status_code == 404  # ReDoc would need a CDN


@pytest.fixture(scope="module")
def page_app(predictor, tmp_path_factory):
    pytest.importorskip("gradio")
    return create_app(predictor, ServeSettings(page=True, examples=0))


def test_cors_answers_no_foreign_origin_by_default(page_app):
    foreign = {"Origin": "http://localhost:3000", "Host": "127.0.0.1:7860"}  # a server on loopback
    with TestClient(page_app) as c:
        for path in ("/", "/gradio_api/info", "/v1/model"):
            r = c.get(path, headers=foreign)
            assert "access-control-allow-origin" not in r.headers, path
            assert "access-control-allow-credentials" not in r.headers, path
            pre = c.options(path, headers={**foreign, "Access-Control-Request-Method": "POST"})
            assert pre.headers.get("access-control-allow-origin") is None, path
            assert pre.headers.get("access-control-allow-credentials") is None, path


def test_cors_answers_a_configured_origin_without_credentials(predictor):
    allowed = "https://line-3.example"
    app = create_app(predictor, ServeSettings(page=False, cors_origins=(allowed,)))
    with TestClient(app) as c:
        r = c.get("/v1/model", headers={"Origin": allowed})
        assert r.headers["access-control-allow-origin"] == allowed
        assert "access-control-allow-credentials" not in r.headers
        assert "access-control-allow-origin" not in c.get("/v1/model", headers={"Origin": "http://localhost:3000"}).headers


@pytest.mark.parametrize("origin", ["notaurl", "https://line-3.example/", "line-3.example:8080", "https://a b"])
def test_a_cors_origin_that_no_browser_sends_is_refused(origin):
    with pytest.raises(ValueError, match="--cors-origin takes an origin"):
        ServeSettings(cors_origins=("https://line-3.example:8080", origin))
    assert ServeSettings(cors_origins=("*", "http://127.0.0.1:3000")).cors_origins[0] == "*"


@pytest.mark.parametrize("key", ["schlüssel", "tab\tkey"])
def test_an_api_key_no_header_can_carry_is_refused_at_start(key):
    """Headers arrive as Latin-1: a UTF-8 key typed into curl never matched, and every request was a 401."""
    with pytest.raises(ValueError, match="must be printable ASCII"):
        ServeSettings(api_key=key)
    assert ServeSettings(api_key="line-3:Key_91!").api_key == "line-3:Key_91!"


def test_small_jobs_run_between_the_tile_batches_of_a_large_one():
    """The large job's predict calls `between` after a tile batch; the small job submitted
    meanwhile is answered there, before the large one finishes."""
    order = []
    small_waiting = threading.Event()

    def predict(images, options, deadline, between):
        if options.task == "large":
            order.append("large starts")
            small_waiting.wait(10)
            between()
            order.append("large ends")
        else:
            order.append("small")
        return [options.task for _ in images]

    batcher = Batcher(predict, max_queue=4, max_batch=2, large_cost=8)
    batcher.start()
    try:
        large = batcher.submit("big", Options(task="large"), cost=50)
        while not order:
            small_waiting.wait(0.01)
        small = batcher.submit("frame", Options(task="small"), cost=4)
        small_waiting.set()
        assert small.future.result(10) == "small" and large.future.result(10) == "large"
    finally:
        batcher.stop()
    assert order == ["large starts", "small", "large ends"]
    assert large.image is None and small.image is None  # no decoded image outlives its answer


def test_large_lane_is_bounded_and_a_job_past_its_deadline_is_dropped():
    gate = threading.Event()
    batcher = Batcher(lambda images, o, d, b: gate.wait(10) and list(images), max_queue=4, max_batch=1,
                      large_cost=8, max_large=1)
    batcher.start()
    try:
        first = batcher.submit("a", Options(), cost=1)
        while not batcher.busy:
            gate.wait(0.01)
        expired = batcher.submit("b", Options(), cost=1, deadline=0.0)
        batcher.submit("c", Options(), cost=100)
        with pytest.raises(Exception) as full:
            batcher.submit("d", Options(), cost=100)
        assert full.value.status == 503
        gate.set()
        assert first.future.result(10) == "a"
        with pytest.raises(TimeoutError):
            expired.future.result(10)
    finally:
        batcher.stop()


def test_large_uploads_are_decoded_one_at_a_time(monkeypatch):
    """Two 7000x7000 uploads decoding at once took both cores of a 2-core line PC, and normal
    frames waited (bench/load.py, mixed phase): large decodes share one slot, normal ones none."""
    import time as clock

    from loomlens.serve import app as serve_app

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()

    large = encoded(Image.new("1", (8000, 4000)), "PNG")  # 32 MP in its header, a few kB
    normal = encoded(Image.new("RGB", (64, 48)), "JPEG")
    running, most, lock = {"large": 0, "normal": 0}, {"large": 0, "both": 0}, threading.Lock()

    def slow_decode(data, *_args):
        kind = "large" if data is large else "normal"
        with lock:
            running[kind] += 1
            most["large"] = max(most["large"], running["large"])
            most["both"] = max(most["both"], running["large"] + running["normal"])
        clock.sleep(0.2)
        with lock:
            running[kind] -= 1
        return Image.new("RGB", (64, 48)), (64, 48)

    class Inputs:
        def model_inputs(self, *_args):
            return 1

    monkeypatch.setattr(serve_app, "decode_image", slow_decode)
    service = serve_app.Service(Inputs(), ServeSettings(page=False))
    threads = [threading.Thread(target=service.prepare, args=(data, "od", None, "auto", 0.0))
               for data in (large, large, normal)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == {"large": 1, "both": 2}  # never two large decodes at once; a normal one alongside
