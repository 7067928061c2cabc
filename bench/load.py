"""Load test for `loomlens serve`: N concurrent clients for T seconds on loopback.

Starts its own server on 127.0.0.1 (a free port, nothing else is ever a target), runs N client
threads that POST one synthetic loom frame to /v1/predict in a loop until T seconds have
passed (every loop also bounded by --max-requests), polls /healthz throughout, stops the
server, prints a table and writes a JSON result.

    python bench/load.py --clients 8 --seconds 20 --out runs/bench/load.json

Reports requests/s, p50/p95/p99 latency, answers by status (503 = the bounded queue said
"busy", which is the designed overload answer), transport errors, whether /healthz answered
throughout, and whether any request went unanswered. Exit status 1 if a request went
unanswered or /healthz failed. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def make_frame(folder: Path, size: tuple[int, int]) -> Path:
    from loomlens.data.synth import synthesize

    records = synthesize(folder, images=2, seed=5, size=size, negative_fraction=0.5)
    records.sort(key=lambda r: not r.boxes)
    return folder / records[0].image


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loomlens.cli", "serve", "--model", args.model, "--host", HOST,
           "--port", str(port), "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch),
           "--log-level", "warning"]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    if not args.page:
        cmd += ["--no-page"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    env.pop("LOOMLENS_API_KEY", None)
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    sys.exit(f"server did not become healthy in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def client_loop(url: str, data: bytes, fields: dict, deadline: float, max_requests: int,
                timeout: float, out: list) -> None:
    with httpx.Client(base_url=url, timeout=timeout) as c:
        for _ in range(max_requests):
            if time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/predict", files={"image": ("frame.jpg", data, "image/jpeg")}, data=fields)
                out.append((r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")))
                if r.status_code == 503:  # the queue is full: back off as told, a little
                    time.sleep(min(0.05, float(r.headers.get("retry-after", 1)) / 20))
            except httpx.HTTPError as exc:
                out.append((type(exc).__name__, time.perf_counter() - t0, None))


def health_loop(url: str, stop: threading.Event, period: float, out: list) -> None:
    with httpx.Client(base_url=url, timeout=5) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.get("/healthz")
                body = r.json() if r.status_code == 200 else {}
                out.append((r.status_code, time.perf_counter() - t0, body.get("queue", {}).get("queued")))
            except (httpx.HTTPError, ValueError) as exc:
                out.append((type(exc).__name__, time.perf_counter() - t0, None))
            stop.wait(period)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=100_000, help="per client, a hard bound")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--task", default="od")
    ap.add_argument("--tile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--size", default="768x432", help="synthetic frame size WxH")
    ap.add_argument("--image", default=None, help="use this image instead of a synthetic frame")
    ap.add_argument("--page", action="store_true", help="also mount the web page (off: API only)")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--health-period", type=float, default=0.5)
    ap.add_argument("--health-slow-s", type=float, default=2.0, help="a /healthz slower than this fails")
    ap.add_argument("--out", default="runs/bench/load.json")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.seconds > 600:
        ap.error("need --clients >= 1 and 0 < --seconds <= 600")

    work = Path(tempfile.mkdtemp(prefix="loomlens-load-"))
    if args.image:
        frame = Path(args.image)
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        frame = make_frame(work / "frames", (w, h))
    data = frame.read_bytes()
    port = free_port()
    url = f"http://{HOST}:{port}"
    log_path = work / "server.log"
    process = start_server(args, port, log_path)
    try:
        startup_s = wait_ready(url, process, 180, log_path)
        # one warm-up request so the first client does not pay for lazy initialisation
        fields = {"task": args.task, "tile": args.tile}
        httpx.post(url + "/v1/predict", files={"image": ("f.jpg", data)}, data=fields, timeout=120)
        results: list[list] = [[] for _ in range(args.clients)]
        health: list = []
        stop = threading.Event()
        monitor = threading.Thread(target=health_loop, args=(url, stop, args.health_period, health), daemon=True)
        monitor.start()
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(url, data, fields, deadline, args.max_requests,
                                          args.request_timeout, results[i]))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + args.request_timeout + 30)
        elapsed = time.monotonic() - t0
        stuck = sum(t.is_alive() for t in threads)
        stop.set()
        monitor.join(10)
        server_stats = httpx.get(url + "/healthz", timeout=5).json().get("queue", {})
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()

    answers = [r for rs in results for r in rs]
    by_status = Counter(str(s) for s, _, _ in answers)
    ok = [lat for s, lat, _ in answers if s == 200]
    answered = [lat for s, lat, _ in answers if isinstance(s, int)]
    unanswered = sum(1 for s, _, _ in answers if not isinstance(s, int)) + stuck
    health_bad = [h for h in health if h[0] != 200 or h[1] > args.health_slow_s]
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    report = {
        "config": {**vars(args), "image_bytes": len(data), "frame": str(frame)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "startup_s": round(startup_s, 2),
        "elapsed_s": round(elapsed, 2),
        "requests": len(answers),
        "ok": len(ok),
        "requests_per_s": round(len(answered) / elapsed, 2),
        "ok_per_s": round(len(ok) / elapsed, 2),
        "latency_ms_ok": {"p50": ms(percentile(ok, 0.5)), "p95": ms(percentile(ok, 0.95)),
                          "p99": ms(percentile(ok, 0.99)), "max": ms(max(ok) if ok else None),
                          "mean": ms(statistics.fmean(ok) if ok else None)},
        "latency_ms_all": {"p50": ms(percentile(answered, 0.5)), "p95": ms(percentile(answered, 0.95))},
        "by_status": dict(sorted(by_status.items())),
        "unanswered": unanswered,
        "health": {"checks": len(health), "failed": len(health_bad),
                   "max_ms": ms(max((h[1] for h in health), default=None)),
                   "max_queued": max((h[2] for h in health if h[2] is not None), default=None),
                   "answered_throughout": bool(health) and not health_bad},
        "server": server_stats,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    rows = [
        ("clients x seconds", f"{args.clients} x {args.seconds:g} s (max_queue {args.max_queue}, max_batch {args.max_batch})"),
        ("frame", f"{frame.name} ({len(data) / 1024:.0f} kB), task {args.task}, tile {args.tile}"),
        ("requests answered", f"{len(answered)} ({report['requests_per_s']} req/s)"),
        ("200 OK", f"{len(ok)} ({report['ok_per_s']} req/s)"),
        ("latency p50 / p95 / p99 (200)", " / ".join(f"{v} ms" for v in (report["latency_ms_ok"]["p50"],
                                                                      report["latency_ms_ok"]["p95"],
                                                                      report["latency_ms_ok"]["p99"]))),
        ("answers by status", ", ".join(f"{k}: {v}" for k, v in report["by_status"].items()) or "none"),
        ("unanswered", str(unanswered)),
        ("/healthz", f"{len(health)} checks, {len(health_bad)} failed, max {report['health']['max_ms']} ms"),
        ("server batches", f"{server_stats.get('batches')} for {server_stats.get('done')} images, "
                           f"{server_stats.get('rejected')} rejected"),
        ("result", str(out)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nloomlens serve load test")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    good = unanswered == 0 and report["health"]["answered_throughout"]
    print("  verdict" + " " * (width - 5) + ("OK: every request answered, /healthz throughout"
                                             if good else "FAILED: see unanswered / health above"))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
