"""A throwaway PostgreSQL server for the store tests: Debian's `postgresql` binaries, a cluster in
a temp folder, listening on 127.0.0.1 only, stopped at the end. Without the binaries the tests
that need it skip, except under CI=true, where they fail (`make test-deps` installs them)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A SQLAlchemy URL of a fresh PostgreSQL database on 127.0.0.1."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    problem = None
    if not (initdb and pg_ctl):
        problem = "PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql; `make test-deps`)"
    run_as: list[str] = []
    if problem is None and os.geteuid() == 0:  # initdb refuses root: run the cluster as `postgres`
        try:
            pwd.getpwnam("postgres")
            run_as = ["runuser", "-u", "postgres", "--"]
        except KeyError:
            problem = "running as root and there is no `postgres` user to run the server as"
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"POSTGRESQL TEST CANNOT RUN IN CI: {problem}", pytrace=False)
        pytest.skip(problem)
    folder = Path(tempfile.mkdtemp(prefix="loomlens-pg-"))
    os.chmod(folder, 0o777)
    data = folder / "data"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "loomlens", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, env=env)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} -c fsync=off"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "-t", "60",
                    "start"], check=True, capture_output=True, env=env)
    try:
        url = f"postgresql+psycopg://loomlens@127.0.0.1:{port}/postgres"
        from sqlalchemy import create_engine, text

        deadline = time.monotonic() + 30
        while True:
            try:
                with create_engine(url).connect() as conn:
                    conn.execute(text("select 1"))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, env=env)
        shutil.rmtree(folder, ignore_errors=True)
