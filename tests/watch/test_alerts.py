"""Alerts: a webhook that fails first is retried with back-off until it takes the event; a
command gets the event JSON on stdin and in $LOOMLENS_EVENT; a dead receiver is given up."""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loomlens.watch import Alerter


class Hook(BaseHTTPRequestHandler):
    """Answers 500 to the first POST, 200 after; keeps the bodies it took."""

    calls = 0
    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.calls += 1
        if Hook.calls == 1:
            self.send_response(500)
        else:
            Hook.bodies.append(json.loads(body))
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def hook():
    Hook.calls, Hook.bodies = 0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alert"
    server.shutdown()
    server.server_close()


def test_webhook_retry_and_command(hook, tmp_path) -> None:
    out = tmp_path / "alert.json"
    script = f"import os,sys; open({str(out)!r},'w').write(sys.stdin.read() + '\\n' + os.environ['LOOMLENS_EVENT'])"
    alerter = Alerter(webhooks=[hook], commands=[f"{sys.executable} -c \"{script}\""], retries=2, backoff_s=0.05)
    alerter.send({"id": 7, "camera": "loom1", "label": "hole"})
    alerter.close(timeout_s=60)
    assert Hook.calls == 2 and Hook.bodies == [{"id": 7, "camera": "loom1", "label": "hole"}]
    stdin, env = out.read_text().split("\n")
    assert json.loads(stdin) == json.loads(env) == {"id": 7, "camera": "loom1", "label": "hole"}
    assert (alerter.sent, alerter.failed) == (2, 0)


def test_a_dead_receiver_is_given_up(tmp_path) -> None:
    alerter = Alerter(commands=[f"{sys.executable} -c \"raise SystemExit(3)\""], retries=1, backoff_s=0.01)
    alerter.send({"id": 1})
    alerter.close(timeout_s=60)
    assert (alerter.sent, alerter.failed) == (0, 1)


def test_bad_alert_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="webhook"):
        Alerter(webhooks=["localhost:8000"])
    with pytest.raises(ValueError, match="empty"):
        Alerter(commands=["  "])
    # said at start, naming the option and what to fix: not a bare "No closing quotation", nor a
    # URL with no host or a bad port taken, to fail at the first defect after every retry
    with pytest.raises(ValueError, match="--on-event \"notify 'roll\" cannot be split into a program and its "
                                         "arguments \\(No closing quotation\\)"):
        Alerter(commands=["notify 'roll"])
    for url, shown, why in [("http://", "http:///...", "no host"), ("https:///hook", "https:///...", "no host"),
                            ("http://line:port/", "http://line:port/...", "Invalid port")]:
        with pytest.raises(ValueError, match=f"webhook '{re.escape(shown)}' is not a URL to POST to \\({why}"):
            Alerter(webhooks=[url])


def test_a_failed_alert_is_logged_without_the_secrets_of_its_receiver(hook, caplog) -> None:
    """A webhook's user:password, path token and query, and a command's arguments (a bearer
    token) went into the log line of a failed alert, a file many can read."""
    secret_hook = hook.replace("http://", "http://line:hunter2@") + "/T0KEN?key=s3cr3t"
    command = f"{sys.executable} -c \"raise SystemExit(3)\" --token s3cr3t"
    alerter = Alerter(webhooks=[secret_hook], commands=[command], retries=0)
    alerter.send({"id": 1})
    alerter.close(timeout_s=60)
    assert (alerter.sent, alerter.failed) == (0, 2)
    assert "hunter2" not in caplog.text and "s3cr3t" not in caplog.text and "T0KEN" not in caplog.text
    assert f"alert to {hook.rsplit('/', 1)[0]}/... failed after 1 tries: HTTP 500" in caplog.text, caplog.text
    assert f"alert to {sys.executable} failed after 1 tries: exit status 3" in caplog.text, caplog.text
