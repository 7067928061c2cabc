"""Helpers for the serve tests: real `loomlens serve` processes on loopback, hostile inputs.

"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-3f1c"
BUSY_DELAY_MS = 1500
BODY_LIMIT_MB = 2
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60, **kwargs)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        pytest.fail(f"{self.name} server did not answer /healthz in {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(name: str, args: list[str], log_dir: Path, api_key: str | None = None,
                 delay_ms: float = 0) -> Server:
    """Start `loomlens serve` on a free port; with `delay_ms`, through `slow_serve.py`, which
    makes every batch sleep that long first."""
    port = free_port()
    log = log_dir / f"{name}.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOOMLENS_API_KEY", None)
    if api_key:
        env["LOOMLENS_API_KEY"] = api_key  # the env spelling; --api-key is tested by the CLI help
    entry = [str(Path(__file__).with_name("slow_serve.py")), str(delay_ms)] if delay_ms else ["-m", "loomlens.cli"]
    cmd = [sys.executable, *entry, "serve", "--model", "tiny", "--port", str(port), "--log-level", "warning", *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return Server(name, port, process, log, api_key)


def png_bomb(width: int = 20_000, height: int = 10_000) -> bytes:
    """A valid 1-bit PNG of width x height (200 MP by default) in ~25 kB: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bytes(width: int, height: int, noise: bool = False) -> bytes:
    import numpy as np
    from PIL import Image

    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), (90, 90, 90))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_events_db(folder: Path, *, now) -> Path:
    """A watcher's database in `folder`: 3 events on 2 cameras (loom1 hole 30 h before `now`,
    loom2 stain 15 h before, loom1 stain at `now` with its frame and crop JPEGs on disk)."""
    from datetime import timedelta

    from PIL import Image

    from loomlens.events import Event, EventStore

    path = folder / "events.db"
    store = EventStore(path)
    for i, (camera, label) in enumerate([("loom1", "hole"), ("loom2", "stain"), ("loom1", "stain")]):
        at = now - timedelta(hours=30) + timedelta(hours=15 * i)
        frame = crop = None
        if i == 2:
            frame, crop = folder / "f.jpg", folder / "c.jpg"
            Image.new("RGB", (64, 36), "gray").save(frame)
            Image.new("RGB", (20, 20), "white").save(crop)
            frame, crop = str(frame), str(crop)
        store.start(Event(camera=camera, label=label, started_at=at, last_seen_at=at, score=0.2 + 0.3 * i,
                          x1=1, y1=1, x2=9, y2=9, width=64, height=36, frame_path=frame, crop_path=crop))
    store.close()
    return path
