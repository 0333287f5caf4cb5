"""Typed errors and the one table from error kind to HTTP status in each dialect.

Engine and registry code raise these; the API layer renders them (api/errors.py).
Messages are meant for the person who sent the request: they name the field, the
value and what is allowed. Internal failures never carry the original exception text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    VALIDATION = "validation"
    EMPTY = "empty"
    TOKENIZER = "tokenizer"
    OVERLOADED = "overloaded"
    BACKEND = "backend"
    UNHEALTHY = "unhealthy"
    MODEL_NOT_FOUND = "model_not_found"
    UNAUTHORIZED = "unauthorized"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"


@dataclass(frozen=True)
class Rendering:
    tei_status: int
    tei_type: str
    openai_status: int
    openai_type: str
    openai_code: str | None


# kind -> how each dialect reports it.
STATUS_TABLE: dict[ErrorKind, Rendering] = {
    ErrorKind.VALIDATION: Rendering(422, "Validation", 422, "invalid_request_error", None),
    ErrorKind.EMPTY: Rendering(400, "Empty", 400, "invalid_request_error", "empty_input"),
    ErrorKind.TOKENIZER: Rendering(422, "Tokenizer", 422, "invalid_request_error", None),
    ErrorKind.OVERLOADED: Rendering(
        429, "Overloaded", 429, "rate_limit_error", "rate_limit_exceeded"
    ),
    ErrorKind.BACKEND: Rendering(424, "Backend", 500, "server_error", "internal_error"),
    ErrorKind.UNHEALTHY: Rendering(503, "Unhealthy", 503, "server_error", "service_unavailable"),
    ErrorKind.MODEL_NOT_FOUND: Rendering(
        422, "Validation", 404, "invalid_request_error", "model_not_found"
    ),
    ErrorKind.UNAUTHORIZED: Rendering(
        401, "Unauthorized", 401, "invalid_request_error", "invalid_api_key"
    ),
    ErrorKind.PAYLOAD_TOO_LARGE: Rendering(
        413, "Validation", 413, "invalid_request_error", "payload_too_large"
    ),
    # Refused by the HTTP protocol, before a request reaches the app.
    ErrorKind.HEADERS_TOO_LARGE: Rendering(
        431, "Validation", 431, "invalid_request_error", "headers_too_large"
    ),
    ErrorKind.REQUEST_TIMEOUT: Rendering(
        408, "Validation", 408, "invalid_request_error", "request_timeout"
    ),
    ErrorKind.TOO_MANY_CONNECTIONS: Rendering(
        503, "Overloaded", 503, "server_error", "too_many_connections"
    ),
}


class EmbedsvcError(Exception):
    """Base of all errors that reach a client."""

    kind: ErrorKind = ErrorKind.VALIDATION

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds, for 429 and 503 answers


class ValidationError(EmbedsvcError):
    kind = ErrorKind.VALIDATION


class EmptyInputError(EmbedsvcError):
    kind = ErrorKind.EMPTY


class OverloadedError(EmbedsvcError):
    kind = ErrorKind.OVERLOADED


class BackendError(EmbedsvcError):
    """A forward pass failed. The message is generic; details go to the log."""

    kind = ErrorKind.BACKEND


class UnhealthyError(EmbedsvcError):
    kind = ErrorKind.UNHEALTHY


class ModelNotFoundError(EmbedsvcError):
    kind = ErrorKind.MODEL_NOT_FOUND


class PayloadTooLargeError(EmbedsvcError):
    kind = ErrorKind.PAYLOAD_TOO_LARGE


class ConfigError(Exception):
    """models.yaml or settings are wrong, or a model cannot be loaded. Stops start-up."""


class ClientDisconnected(Exception):
    """The client closed the connection before its vectors were ready (nobody to answer)."""
