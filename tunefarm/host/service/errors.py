"""The refusal the service's parts raise and its handlers answer as JSON."""
from __future__ import annotations

import tornado.web


class ApiError(tornado.web.HTTPError):
    """An HTTP error answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(status, reason=None)
        self.message = message

