"""Fixtures for the serve tests: real `loomlens serve` processes on loopback, synthetic frames.

Two servers, started once per session and only if a collected test needs them, in parallel:
- `server`: the defaults (127.0.0.1, page on, no key) with a 2 MB body limit;
- `busy_server`: an API key, a queue of 1, batches of 1 and every batch slowed by 1.5 s
  (`slow_serve.py` wraps the server's predict), so a handful of concurrent requests must
  overflow the queue.
Both run the real tiny model through `loomlens.predict`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import API_KEY, BODY_LIMIT_MB, BUSY_DELAY_MS, Server, start_server


@pytest.fixture(scope="session")
def _servers(request, tmp_path_factory):
    """Start the servers the collected tests use, all at once (their start-ups overlap)."""
    wanted = {name for item in request.session.items for name in ("server", "busy_server")
              if name in item.fixturenames}
    log_dir = tmp_path_factory.mktemp("serve-logs")
    examples = tmp_path_factory.mktemp("examples")
    servers: dict[str, Server] = {}
    if "server" in wanted:
        servers["server"] = start_server(
            "server", ["--max-body-mb", str(BODY_LIMIT_MB), "--examples", "4",
                       "--examples-dir", str(examples)], log_dir)
    if "busy_server" in wanted:
        servers["busy_server"] = start_server(
            "busy_server", ["--max-queue", "1", "--max-batch", "1", "--no-page"], log_dir, api_key=API_KEY,
            delay_ms=BUSY_DELAY_MS)
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="session")
def server(_servers) -> Server:
    s = _servers["server"]
    s.wait_ready()
    return s


@pytest.fixture(scope="session")
def busy_server(_servers) -> Server:
    s = _servers["busy_server"]
    s.wait_ready()
    return s


@pytest.fixture(scope="session")
def frames(tmp_path_factory) -> list[Path]:
    """Synthetic loom frames (768x432 JPEG), defects first."""
    from loomlens.data.synth import synthesize

    out = tmp_path_factory.mktemp("frames")
    records = synthesize(out, images=4, seed=11, negative_fraction=0.25)
    records.sort(key=lambda r: not r.boxes)
    return [out / r.image for r in records]


@pytest.fixture(scope="session")
def frame_bytes(frames) -> bytes:
    return frames[0].read_bytes()
