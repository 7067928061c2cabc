"""Errors the server answers with: a status, a short machine-readable code, a message for people."""

from __future__ import annotations


class InputError(Exception):
    """Bad input from a client: answered as `{"error": {"status", "code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


class QueueFull(InputError):
    """The request queue is full: 503 with a `Retry-After` estimate in seconds."""

    def __init__(self, retry_after: int, capacity: int):
        super().__init__(
            503, "queue_full",
            f"the server is busy ({capacity} requests waiting); retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after
