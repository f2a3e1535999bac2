"""What can go wrong with a write, in the reconciler's terms (no client imported here)."""

from __future__ import annotations


class Conflict(Exception):
    """The object changed since the decision was made (HTTP 409): decide again."""


class Gone(Exception):
    """The object no longer exists (HTTP 404)."""


class ApiError(Exception):
    """The API server refused a request; `status` is the HTTP status, `message` its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
