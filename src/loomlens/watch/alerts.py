"""Alerts for new events: a webhook POST (httpx) and/or a command, each retried with back-off.

Alerts are sent by one background thread from a bounded queue, so a slow or dead receiver
never holds up the frames; when the queue is full the alert is dropped and logged (the event
itself is already in the database).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shlex
import subprocess
import threading
import time

import httpx

log = logging.getLogger("loomlens.watch")


def _check_webhook(url: str) -> None:
    """Refuse, at start, a webhook `url` no POST can reach (ValueError naming it and the fix):
    not http(s), no host, a port that is no number. Taken, it failed only at the first defect,
    after every retry, in a log line."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook {_shown(url)!r} is not an http:// or https:// URL: give --webhook "
                         "http(s)://host[:port]/path")
    try:
        why = None if httpx.URL(url).host else "no host"
    except httpx.InvalidURL as err:
        why = str(err)  # httpx names the part it refused (a port, a host), never the whole URL
    if why:
        raise ValueError(f"webhook {_shown(url)!r} is not a URL to POST to ({why}): give --webhook "
                         "http(s)://host[:port]/path")


def _split_command(command: str) -> list[str]:
    """The program and arguments of an `--on-event` `command` (shell words, no shell), or
    ValueError naming the option and the fix, where shlex's own says only "No closing quotation"."""
    try:
        return shlex.split(command)
    except ValueError as err:
        raise ValueError(f"--on-event {command!r} cannot be split into a program and its arguments ({err}): "
                         "close its quotes, or quote a lone ' or \" as a shell would") from None


#: A URL's scheme, if written, and the rest up to its query or fragment.
_SCHEME_REST = re.compile(r"(?:([A-Za-z][A-Za-z0-9+.-]*)://)?([^?#]*)")


def _shown(url: str) -> str:
    """A webhook `url` as a log line or a start-up error may show it, even one no parser takes:
    scheme, host and port; its user:password (all up to the last @), path and query (where a
    hook's token sits) left out as `/...`."""
    scheme, rest = _SCHEME_REST.match(url).groups()
    host = rest.rpartition("@")[2].split("/", 1)[0]
    return f"{scheme}://{host}/..." if scheme else f"{host}/..."


def _why(exc: BaseException) -> str:
    """Why a delivery failed, without what it was sent to (httpx's and subprocess's own
    messages repeat the URL or the command's arguments, tokens included)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, subprocess.CalledProcessError):
        return f"exit status {exc.returncode}"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"no answer within {exc.timeout:g} s"
    return str(exc) or type(exc).__name__  # a connection's or the OS's own words: no URL in them


class Alerter:
    """Sends each event to every webhook and command.

    Args:
        webhooks: URLs that get the event as a JSON POST (2xx counts as delivered).
        commands: command lines run per event (no shell) with the event JSON on stdin and in
            the environment variable LOOMLENS_EVENT (exit 0 counts as delivered).
        retries: further tries after a failed one; `backoff_s` is the first wait, doubled per try.
        timeout_s: how long one POST or command may take.
        max_queue: alerts waiting at most; more are dropped with a warning.
    """

    def __init__(self, *, webhooks: list[str] = (), commands: list[str] = (), retries: int = 3,
                 backoff_s: float = 1.0, timeout_s: float = 10.0, max_queue: int = 100):
        for url in webhooks:
            _check_webhook(url)
        self.commands = [_split_command(c) for c in commands]
        if any(not c for c in self.commands):
            raise ValueError("an alert command is empty; give --on-event 'program args'")
        self.webhooks = list(webhooks)
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.sent = self.failed = self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._client = httpx.Client(timeout=timeout_s)
        self._thread = threading.Thread(target=self._run, name="loomlens-alerts", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        """Whether any webhook or command is set."""
        return bool(self.webhooks or self.commands)

    def send(self, payload: dict) -> None:
        """Queue `payload` for every receiver (returns at once)."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            log.warning("alert queue full: alert for event %s dropped (it is in the database)", payload.get("id"))

    def _post(self, url: str, body: str) -> None:
        response = self._client.post(url, content=body, headers={"Content-Type": "application/json"})
        response.raise_for_status()

    def _run_command(self, args: list[str], body: str) -> None:
        subprocess.run(args, input=body, text=True, timeout=self.timeout_s, check=True,
                       env={**os.environ, "LOOMLENS_EVENT": body}, stdout=subprocess.DEVNULL)

    def _deliver(self, what: str, call) -> None:
        for attempt in range(self.retries + 1):
            try:
                call()
                self.sent += 1
                return
            except (httpx.HTTPError, OSError, subprocess.SubprocessError) as exc:
                if attempt == self.retries:
                    self.failed += 1
                    log.warning("alert to %s failed after %d tries: %s", what, attempt + 1, _why(exc))
                    return
                time.sleep(self.backoff_s * 2 ** attempt)

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                self._queue.task_done()
                return
            body = json.dumps(payload)
            for url in self.webhooks:
                self._deliver(_shown(url), lambda u=url: self._post(u, body))
            for args in self.commands:
                self._deliver(args[0], lambda a=args: self._run_command(a, body))
            self._queue.task_done()

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (waiting at most `timeout_s`), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("alerts still queued at exit were dropped")
        self._thread.join(timeout=timeout_s)
        self._client.close()
