"""The HTTP API against a real `loomlens serve` process (real tiny model) on loopback."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .helpers import BODY_LIMIT_MB, ROOT, jpeg_bytes, png_bomb

TASK_TEXT = {
    "phrase_grounding": "drop",
    "referring_expression_segmentation": "broken-weft",
    "region_to_segmentation": "<loc_100><loc_100><loc_600><loc_600>",
    "region_to_category": "100,80,400,300",  # pixels
}
ALL_TASKS = ["od", "caption", "detailed_caption", "more_detailed_caption", "dense_region_caption",
             "phrase_grounding", "referring_expression_segmentation", "region_to_segmentation",
             "region_to_category", "ocr", "ocr_with_region"]


def check_result(result: dict, task: str, width: int, height: int) -> None:
    assert result["task"] == task
    assert (result["width"], result["height"]) == (width, height)
    for det in result["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, det
        assert isinstance(det["label"], str) and det["label"]
        assert det["score"] is None or 0.0 <= det["score"] <= 1.0
    for poly in result["polygons"]:
        assert all(-1 <= x <= width + 1 and -1 <= y <= height + 1 for x, y in poly["points"])
    assert isinstance(result["text"], str)
    assert 0 <= result["answer_probability"] <= 1  # the model's own: measured on every answer
    assert result["timing_ms"]["inference"] >= 0 and result["batch_size"] >= 1


# -- the happy path ------------------------------------------------------------------------

def test_health_model_docs(server):
    with server.client() as c:
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["queue"]["worker_alive"]
        info = c.get("/v1/model").json()
        assert info["base"] and "versions" in info and isinstance(info["classes"], list)
        assert info["tasks"] == ALL_TASKS
        assert info["serve"]["max_body_mb"] == BODY_LIMIT_MB and info["serve"]["api_key"] is False
        assert "swagger" in c.get("/docs").text.lower()
        assert "/v1/predict" in c.get("/openapi.json").json()["paths"]
        page = c.get("/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        stray = c.get("/v1/predictions")  # the page mounted at / takes no /v1 path: the API's own 404
        assert stray.status_code == 404 and stray.json()["error"]["code"] == "no_such_route"
        wrong = c.get("/v1/predict")  # the route is there, for another method: not a 404 saying "no route"
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST", wrong.text
        assert wrong.json()["error"]["code"] == "method_not_allowed" and "POST" in wrong.json()["error"]["message"]


def test_binds_loopback_by_default(server):
    """The fixture passes no --host: the listening socket must be 127.0.0.1 only."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc/net/tcp on this system")
    port_hex = f"{server.port:04X}"
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and line.split()[1].endswith(":" + port_hex)]
    assert listening == [f"0100007F:{port_hex}"]


def test_predict_multipart_and_json_agree(server, frames):
    from PIL import Image

    data = frames[0].read_bytes()
    width, height = Image.open(frames[0]).size
    with server.client() as c:
        r1 = c.post("/v1/predict", files={"image": ("frame.jpg", data, "image/jpeg")},
                    data={"task": "od", "tile": "on"})
        assert r1.status_code == 200, r1.text
        check_result(r1.json(), "od", width, height)
        r2 = c.post("/v1/predict", json={"image": base64.b64encode(data).decode(), "task": "od",
                                         "tile": "on"})
        assert r2.status_code == 200, r2.text
        r3 = c.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"},
                    params={"task": "od", "tile": "on"})
        assert r3.status_code == 200, r3.text
    assert r1.json()["detections"]  # tiled, the pretrained tiny finds shapes on a loom frame
    assert r1.json()["detections"] == r2.json()["detections"] == r3.json()["detections"]


def test_score_threshold_filters(server, frame_bytes):
    with server.client() as c:
        everything = c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)},
                            data={"score_threshold": "0", "tile": "on"}).json()["detections"]
        scores = sorted(d["score"] for d in everything)
        assert len(scores) >= 2 and scores[0] < scores[-1], scores  # else no threshold cuts between
        cut = (scores[0] + scores[-1]) / 2  # keeps the best box, drops the worst
        kept = c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)},
                      data={"score_threshold": str(cut), "tile": "on"}).json()["detections"]
        above = c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)},
                       data={"score_threshold": str(min(1.0, scores[-1] + 1e-6)), "tile": "on"}).json()
    assert all(d["score"] >= cut for d in kept)
    assert 0 < len(kept) == sum(1 for s in scores if s >= cut) < len(everything)
    assert above["detections"] == []


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task(server, frames, task):
    from PIL import Image

    width, height = Image.open(frames[1]).size
    fields = {"task": task}
    if task in TASK_TEXT:
        fields["text"] = TASK_TEXT[task]
    with server.client() as c:
        r = c.post("/v1/predict", files={"image": ("f.jpg", frames[1].read_bytes())}, data=fields)
    assert r.status_code == 200, r.text
    check_result(r.json(), task, width, height)


def test_concurrent_requests_are_batched(server, frame_bytes):
    def one(_):
        with server.client() as c:
            return c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)}, data={"tile": "off"})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    assert max(r.json()["batch_size"] for r in responses) > 1
    # Batching changes nothing but float rounding: batch-size-dependent CPU kernels move a
    # score in its sixth digit, so boxes and labels must agree exactly, scores closely.
    first = responses[0].json()["detections"]
    for r in responses[1:]:
        other = r.json()["detections"]
        assert [(d["label"], d["box"]) for d in other] == [(d["label"], d["box"]) for d in first]
        assert [d["score"] for d in other] == pytest.approx([d["score"] for d in first], rel=1e-4)


# -- bad input: a clear 4xx JSON error, and the server keeps serving -------------------------

def _bad_inputs(frame: bytes) -> dict[str, tuple[dict, int, str]]:
    big = b"\xff\xd8\xff\xe0" + os.urandom(int((BODY_LIMIT_MB + 1) * 1024 * 1024))
    return {
        "zero_bytes": ({"files": {"image": ("a.jpg", b"", "image/jpeg")}}, 400, "empty_image"),
        "not_an_image": ({"files": {"image": ("a.jpg", b"%PDF-1.7 not a picture" * 50)}}, 400, "not_an_image"),
        "truncated_jpeg": ({"files": {"image": ("a.jpg", frame[: len(frame) // 2])}}, 400, "truncated_image"),
        "decompression_bomb": ({"files": {"image": ("bomb.png", png_bomb(), "image/png")}}, 413, "image_too_large"),
        "body_too_large": ({"files": {"image": ("big.jpg", big)}}, 413, "body_too_large"),
        "unknown_task": ({"files": {"image": ("a.jpg", frame)}, "data": {"task": "segment_everything"}},
                         422, "unknown_task"),
        "missing_text_grounding": ({"files": {"image": ("a.jpg", frame)}, "data": {"task": "phrase_grounding"}},
                                   422, "missing_text"),
        "missing_text_region": ({"files": {"image": ("a.jpg", frame)},
                                 "data": {"task": "region_to_segmentation", "text": "  "}}, 422, "missing_text"),
        "bad_region": ({"files": {"image": ("a.jpg", frame)},
                        "data": {"task": "region_to_category", "text": "the left part"}}, 422, "bad_region"),
        "region_outside_image": ({"files": {"image": ("a.jpg", frame)},
                                  "data": {"task": "region_to_category", "text": "0,0,5000,10"}}, 422, "bad_region"),
        "bad_threshold": ({"files": {"image": ("a.jpg", frame)}, "data": {"score_threshold": "2"}},
                          422, "bad_score_threshold"),
        "bad_tile": ({"files": {"image": ("a.jpg", frame)}, "data": {"tile": "maybe"}}, 422, "bad_tile"),
        "missing_image_field": ({"files": {"picture": ("a.jpg", frame)}}, 422, "missing_image"),
        "bad_base64": ({"json": {"image": "!!not base64!!", "task": "od"}}, 400, "bad_base64"),
        "json_without_image": ({"json": {"task": "od"}}, 422, "missing_image"),
        "bad_json": ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
        "wrong_media_type": ({"content": b"hello", "headers": {"content-type": "text/plain"}},
                             415, "unsupported_media_type"),
    }


BAD_CASES = list(_bad_inputs(b"").keys())


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_clear_4xx(server, frame_bytes, case):
    kwargs, status, code = _bad_inputs(frame_bytes)[case]
    with server.client() as c:
        r = c.post("/v1/predict", **kwargs)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code and error["status"] == status and len(error["message"]) > 10
        assert c.get("/healthz").status_code == 200  # still serving


def test_serves_after_bad_inputs(server, frame_bytes):
    with server.client() as c:
        for kwargs, _, _ in _bad_inputs(frame_bytes).values():
            c.post("/v1/predict", **kwargs)
        r = c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)}, data={"tile": "off"})
        assert r.status_code == 200
        stats = c.get("/healthz").json()["queue"]
    assert stats["failed"] == 0 and stats["queued"] == 0


def test_the_page_api_reads_no_file_but_an_uploaded_one(server, tmp_path):
    """A POST to the page's own API naming a path (/etc/passwd, /proc/self/cmdline) had Gradio
    copy that file into its cache and serve it back: `mount_gradio_app` skips the check that
    `launch()` turns on."""
    import tempfile
    import uuid

    secret = tmp_path / f"secret-{uuid.uuid4().hex}.txt"  # a name no earlier run left in the cache
    secret.write_text("postgresql://qa:hunter2@db/line\n")
    with server.client() as c:
        call = c.post("/gradio_api/call/predict", json={"data": [
            {"path": str(secret), "meta": {"_type": "gradio.FileData"}}, "od", "", 0]})
        assert call.status_code == 200, call.text
        answer = c.get(f"/gradio_api/call/predict/{call.json()['event_id']}").text
    assert "event: error" in answer and "not uploaded by a user" in answer and "hunter2" not in answer
    assert not list((Path(tempfile.gettempdir()) / "gradio").glob(f"*/{secret.name}"))  # never copied


def test_large_frame_within_limits(server):
    """A full-size 2560x1440 camera frame is fine (1.2 MB < 2 MB body, 3.7 MP < 50 MP)."""
    data = jpeg_bytes(2560, 1440)
    with server.client() as c:
        r = c.post("/v1/predict", files={"image": ("big.jpg", data)}, data={"tile": "off"})
    assert r.status_code == 200, r.text
    check_result(r.json(), "od", 2560, 1440)
    assert r.json()["tiled"] is False


# -- the bounded queue: 503 + Retry-After, never a pile-up ----------------------------------

def test_full_queue_answers_503_with_retry_after(busy_server, frame_bytes):
    """Queue 1, batch 1, 1.5 s per batch: of 6 simultaneous requests at most 2 fit (one running,
    one waiting); the rest get 503 without waiting for the running batch, and /healthz answers
    while it runs. Told by the order things finish in, not by wall-clock limits."""

    def one(_):
        with busy_server.client() as c:
            r = c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)}, data={"tile": "off"})
            return r, time.perf_counter()

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        deadline = time.monotonic() + 30
        while not (health := httpx.get(busy_server.url + "/healthz", timeout=30)).json()["queue"]["busy"]:
            assert time.monotonic() < deadline, "the server never started a batch"
            time.sleep(0.05)
        results = [f.result(timeout=60) for f in futures]
    codes = sorted(r.status_code for r, _ in results)
    assert set(codes) <= {200, 503}, codes
    assert 1 <= codes.count(200) <= 2 and codes.count(503) >= 4, codes
    last_served = max(done for r, done in results if r.status_code == 200)
    assert health.status_code == 200  # it answered while a batch ran (it said busy)
    for r, done in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
            assert done < last_served  # refused at once, not once the queue had drained
    stats = httpx.get(busy_server.url + "/healthz", timeout=5).json()["queue"]
    assert stats["rejected"] >= 4
    # and once drained it serves again
    deadline = time.monotonic() + 10
    while httpx.get(busy_server.url + "/healthz").json()["queue"]["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    with busy_server.client() as c:
        r = c.post("/v1/predict", files={"image": ("f.jpg", frame_bytes)}, data={"tile": "off"})
        assert r.status_code == 200, r.text


# -- the API key ----------------------------------------------------------------------------

def test_api_key_protects_v1(busy_server, frame_bytes):
    url = busy_server.url
    no_key = httpx.get(url + "/v1/model")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthorized"
    assert no_key.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.post(url + "/v1/predict", files={"image": ("f.jpg", frame_bytes)}).status_code == 401
    assert httpx.get(url + "/v1/model", headers=busy_server.headers()).status_code == 200
    info = httpx.get(url + "/v1/model", headers={"X-API-Key": busy_server.api_key}).json()
    assert info["serve"]["api_key"] is True
    assert httpx.get(url + "/healthz").status_code == 200  # health stays open for probes
    assert httpx.get(url + "/docs").status_code == 200


def test_cli_help_lists_serve_options():
    out = subprocess.run([sys.executable, "-m", "loomlens.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--adapter", "--host", "--port", "--api-key", "LOOMLENS_API_KEY",
                 "--max-queue", "--max-body-mb", "127.0.0.1", "7860"):
        assert flag in out.stdout, flag


def test_a_port_no_socket_can_take_is_refused_before_the_model_loads(monkeypatch):
    """--port 70000 loaded the model, printed a URL with that port and ended in uvicorn's
    OverflowError traceback."""
    from typer.testing import CliRunner

    import loomlens.predict
    from loomlens.cli import app

    def never(**_):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loomlens.predict, "Predictor", never)
    for port in ("70000", "-1", "0"):
        result = CliRunner().invoke(app, ["serve", "--no-page", "--port", port])
        assert result.exit_code == 2 and "Invalid value for '--port'" in result.output, result.output


def test_a_host_no_socket_can_bind_is_refused_before_the_model_loads(monkeypatch):
    """--host with a name that does not resolve, a malformed address or another machine's
    address loaded the model, printed its URL and ended in uvicorn's bind error."""
    from typer.testing import CliRunner

    import loomlens.predict
    from loomlens.cli import app

    def never(**_):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loomlens.predict, "Predictor", never)
    for host in ("no-such-host.invalid", "300.1.2.3", "http://0.0.0.0", "192.0.2.1"):  # 192.0.2.0/24: documentation only
        result = CliRunner().invoke(app, ["serve", "--no-page", "--host", host])
        assert result.exit_code == 1 and f"--host {host!r}" in result.output, result.output
        assert "0.0.0.0" in result.output and "127.0.0.1" in result.output  # what to give instead


def test_a_request_past_its_deadline_leaves_no_lost_exception_in_the_log(caplog):
    """A 504'd request's job still failed later, in the worker (it stops at its next model
    call), and asyncio logged that late failure as "Future exception was never retrieved" with a
    whole traceback: an operator read a crash into every timed-out large frame."""
    import gc
    import io
    import threading

    from fastapi.testclient import TestClient
    from PIL import Image

    from loomlens.serve import ServeSettings, create_app

    released = threading.Event()

    class Slow:
        def info(self) -> dict:
            return {}

        def model_inputs(self, *_) -> int:
            return 1

        def predict(self, images, **_):
            released.wait(30)
            raise TimeoutError("the prediction ran past its compute deadline")

    frame = io.BytesIO()
    Image.new("RGB", (64, 48)).save(frame, "PNG")
    with TestClient(create_app(Slow(), ServeSettings(page=False, request_timeout_s=0.2))) as client:
        answer = client.post("/v1/predict", files={"image": ("f.png", frame.getvalue())})
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        released.set()
        assert client.get("/healthz").json()["queue"]["failed"] in (0, 1)
        threading.Event().wait(0.3)  # the worker fails the job after the answer
    gc.collect()
    assert "never retrieved" not in caplog.text, caplog.text
