"""Load test for `loomlens serve`, in one run, on loopback: throughput, overload, and whether
someone else's large upload holds normal requests up.

Starts its own server on 127.0.0.1 (a free port, nothing else is ever a target) and runs four
phases, every client loop bounded by time and by --max-requests:

1. `c16`: --clients (16) clients POST a normal synthetic loom frame: req/s, p50/p95;
2. `overload`: --overload-clients (48) clients: how many get 503 (the bounded queue's
   designed answer), and that every request is answered;
3. `quiet`: --normal-clients (2) clients alone: a normal request's p95 (the baseline);
4. `mixed`: the same normal clients while --large-clients (2) keep sending 7000x7000 PNGs:
   the normal p95 now, and its ratio to the baseline (goal: at most 2x).

RSS of the server process is sampled before the first phase, at its peak and after the last.

    python -m bench.load --seconds 20
    python -m bench.load --seconds 5 --clients 16 --overload-clients 32   # a quick check

Writes runs/bench/load.json; `bench/all.py` renders `tables()` into docs/benchmarks.md. Exit
status 1 if a request went unanswered or /healthz failed. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.common import RESULTS, Table, fmt, parse_size, percentile, publish

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads, read when it starts
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


def big_png(folder: Path, side: int) -> Path:
    """A side x side flat PNG: a few hundred kB that decode to side^2 pixels (the issue's upload)."""
    from PIL import Image

    path = folder / f"large-{side}.png"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (90, 90, 90)).save(path, "PNG")
    return path


def client_loop(url: str, data: bytes, name: str, fields: dict, deadline: float, max_requests: int,
                timeout: float, out: list) -> None:
    """POST `data` until `deadline` (at most `max_requests` times); appends (status, seconds)."""
    with httpx.Client(base_url=url, timeout=timeout) as c:
        for _ in range(max_requests):
            if time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/predict", files={"image": (name, data)}, data=fields)
                out.append((r.status_code, time.perf_counter() - t0))
                if r.status_code == 503:  # the queue is full: back off as told, a little
                    time.sleep(min(0.05, float(r.headers.get("retry-after", 1)) / 20))
            except httpx.HTTPError as exc:
                out.append((type(exc).__name__, time.perf_counter() - t0))


def health_loop(url: str, stop: threading.Event, period: float, out: list) -> None:
    with httpx.Client(base_url=url, timeout=5) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.get("/healthz")
                out.append((r.status_code, time.perf_counter() - t0))
            except httpx.HTTPError as exc:
                out.append((type(exc).__name__, time.perf_counter() - t0))
            stop.wait(period)


def rss_mb(pid: int) -> float:
    """The server's resident memory now (MiB)."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def phase(url: str, groups: dict[str, tuple[int, bytes, str]], fields: dict, args, pid: int) -> dict:
    """Run every group's clients (name -> (clients, body, file name)) for --seconds at once;
    returns per group: answers by status, latencies of the 200s, req/s; and the peak RSS."""
    results = {g: [[] for _ in range(n)] for g, (n, _, _) in groups.items()}
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(url, body, fname, fields, deadline, args.max_requests,
                                      args.request_timeout, results[g][i]))
               for g, (n, body, fname) in groups.items() for i in range(n)]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline + args.request_timeout + 30:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.25)
    elapsed = time.monotonic() - t0
    out = {"elapsed_s": round(elapsed, 2), "stuck": sum(t.is_alive() for t in threads), "peak_rss_mb": round(peak)}
    for g, per_client in results.items():
        answers = [a for rs in per_client for a in rs]
        ok = [s for code, s in answers if code == 200]
        out[g] = {"clients": groups[g][0], "requests": len(answers),
                  "by_status": dict(sorted(Counter(str(c) for c, _ in answers).items())),
                  "unanswered": sum(1 for c, _ in answers if not isinstance(c, int)),
                  "req_per_s": round(sum(isinstance(c, int) for c, _ in answers) / elapsed, 2),
                  "ok_per_s": round(len(ok) / elapsed, 2),
                  "p50_ms": ms(percentile(ok, 0.5)), "p95_ms": ms(percentile(ok, 0.95)),
                  "max_ms": ms(max(ok) if ok else None)}
    return out


def ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The load test's settings from the command line (`--help` lists them)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="phase c16: concurrent normal clients")
    ap.add_argument("--overload-clients", type=int, default=48)
    ap.add_argument("--normal-clients", type=int, default=2, help="phases quiet and mixed")
    ap.add_argument("--large-clients", type=int, default=2, help="phase mixed: clients sending large PNGs")
    ap.add_argument("--large-side", type=int, default=7000)
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--max-requests", type=int, default=10_000, help="per client and phase, a hard bound")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--task", default="od")
    ap.add_argument("--tile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--size", default="768x432", help="synthetic frame size WxH")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--health-period", type=float, default=0.5)
    ap.add_argument("--health-slow-s", type=float, default=2.0, help="a /healthz slower than this fails")
    ap.add_argument("--page", action="store_true", help="also mount the web page (off: API only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in the server (its OMP_NUM_THREADS; default: torch's own choice)")
    ap.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = ap.parse_args(argv)
    if min(args.clients, args.overload_clients, args.normal_clients) < 1 or not 0 < args.seconds <= 600:
        ap.error("need clients >= 1 and 0 < --seconds <= 600")
    return args


def run_phases(args: argparse.Namespace, url: str, pid: int, frame: Path, large: bytes) -> dict:
    """Warm the server at `url` up, then run the four phases against it while a thread polls
    /healthz. Returns the phases, the health checks (status, seconds) and the server's RSS
    (MB) before and after."""
    data, fields = frame.read_bytes(), {"task": args.task, "tile": args.tile}
    # one warm-up request so the first client does not pay for lazy initialisation
    httpx.post(url + "/v1/predict", files={"image": ("f.jpg", data)}, data=fields, timeout=120)
    rss_before, health = rss_mb(pid), []
    stop = threading.Event()
    monitor = threading.Thread(target=health_loop, args=(url, stop, args.health_period, health), daemon=True)
    monitor.start()
    normal = (args.normal_clients, data, frame.name)
    phases = {
        "c16": phase(url, {"normal": (args.clients, data, frame.name)}, fields, args, pid),
        "overload": phase(url, {"normal": (args.overload_clients, data, frame.name)}, fields, args, pid),
        "quiet": phase(url, {"normal": normal}, fields, args, pid),
        "mixed": phase(url, {"normal": normal, "large": (args.large_clients, large, "large.png")}, fields, args, pid),
    }
    time.sleep(2)  # let the last answers' buffers go
    rss_after = rss_mb(pid)
    stop.set()
    monitor.join(10)
    return {"phases": phases, "health": health, "rss": (rss_before, rss_after)}


def summarise(args: argparse.Namespace, measured: dict, startup_s: float, server: dict, sizes: tuple[int, int]
              ) -> dict:
    """The result to publish: the phases, the normal p95's ratio mixed / quiet, memory, every
    request left unanswered and the failed health checks."""
    phases, health = measured["phases"], measured["health"]
    quiet, mixed = phases["quiet"]["normal"]["p95_ms"], phases["mixed"]["normal"]["p95_ms"]
    unanswered = sum(p["stuck"] + sum(g["unanswered"] for k, g in p.items() if isinstance(g, dict))
                     for p in phases.values())
    health_bad = [x for x in health if x[0] != 200 or x[1] > args.health_slow_s]
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "frame_bytes": sizes[0], "large_bytes": sizes[1],
        "startup_s": round(startup_s, 2),
        "phases": phases,
        "normal_p95_ratio": round(mixed / quiet, 2) if quiet and mixed else None,
        "rss_mb": {"before": round(measured["rss"][0]), "peak": max(p["peak_rss_mb"] for p in phases.values()),
                   "after": round(measured["rss"][1])},
        "unanswered": unanswered,
        "health": {"checks": len(health), "failed": len(health_bad),
                   "max_ms": ms(max((x[1] for x in health), default=None))},
        "server": server,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loomlens-load-"))
    frame = make_frame(work / "frames", parse_size(args.size))
    large = big_png(work / "large", args.large_side).read_bytes()
    port = free_port()
    url = f"http://{HOST}:{port}"
    log_path = work / "server.log"
    process = start_server(args, port, log_path)
    try:
        startup_s = wait_ready(url, process, 180, log_path)
        measured = run_phases(args, url, process.pid, frame, large)
        server = httpx.get(url + "/healthz", timeout=5).json().get("queue", {})
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()

    result = summarise(args, measured, startup_s, server, (frame.stat().st_size, len(large)))
    publish("load", result, args.out, argv, tables)
    good = result["unanswered"] == 0 and not result["health"]["failed"]
    print("verdict: " + ("OK: every request answered, /healthz throughout" if good else
                         "FAILED: see unanswered / health above"))
    return 0 if good else 1


def tables(result: dict) -> list[Table]:
    """The load test as one table per run: each phase's answers, and the memory."""
    c = result["config"]
    rows = []
    for name, what in (("c16", f"{c['clients']} clients, normal frames"),
                       ("overload", f"{c['overload_clients']} clients, normal frames"),
                       ("quiet", f"{c['normal_clients']} clients, normal frames"),
                       ("mixed", f"{c['normal_clients']} normal + {c['large_clients']} sending "
                                 f"{c['large_side']}x{c['large_side']} PNGs")):
        p = result["phases"][name]
        for group, g in p.items():
            if not isinstance(g, dict):
                continue
            statuses = ", ".join(f"{k}: {v}" for k, v in g["by_status"].items()) or "none"
            rows.append([f"{name}: {what}" + ("" if group == "normal" else " (the large ones)"),
                         f"{g['req_per_s']:.2f}", fmt(g["p50_ms"], 0), fmt(g["p95_ms"], 0), statuses])
    rss = result["rss_mb"]
    ratio = result["normal_p95_ratio"]
    return [Table(
        f"`loomlens serve` under load on loopback: model {c['model']}, {c['seconds']:g} s per phase, "
        f"max_queue {c['max_queue']}, max_batch {c['max_batch']}, frame {c['size']} task {c['task']} tile {c['tile']}",
        ["phase", "req/s", "p50 ms", "p95 ms", "answers by status"], rows,
        [f"normal request p95 while large PNGs are queued / its p95 alone: "
         f"{'-' if ratio is None else f'{ratio:.2f}x'} (goal: at most 2x)",
         f"server RSS: {rss['before']} MiB before, {rss['peak']} MiB at peak, {rss['after']} MiB after",
         f"unanswered: {result['unanswered']}; /healthz: {result['health']['checks']} checks, "
         f"{result['health']['failed']} failed, slowest {result['health']['max_ms']} ms",
         "503 is the bounded queue's designed answer to overload (with Retry-After); a large upload "
         "is downscaled to the server's --max-side and --max-tiles and runs in the large lane."],
    )]


if __name__ == "__main__":
    sys.exit(main())
