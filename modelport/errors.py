"""One error hierarchy for every front-end.

Each class knows its HTTP status, its CLI exit code and a short machine-readable ``kind`` (the
ZeroMQ and client error name). Handlers look these up; call sites never translate.
"""

from __future__ import annotations


class ModelportError(Exception):
    status = 500
    exit_code = 1
    kind = "internal"

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.input_name = input_name

    def body(self) -> dict:
        # "kind" is ours, beside the contract's fields: a client maps it back to this class.
        body = {"error": self.message, "kind": self.kind}
        if self.input_name is not None:
            body["input"] = self.input_name
        return body

    def headers(self) -> dict[str, str]:
        return {}


class BadInput(ModelportError):
    """Malformed body, undecodable image, wrong shape or dtype, missing input."""

    status = 400
    exit_code = 1
    kind = "bad_input"


class PayloadTooLarge(ModelportError):
    status = 413
    kind = "too_large"


class Unauthorized(ModelportError):
    """The management API was called without the right token."""

    status = 401
    kind = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="modelport"'}


class Forbidden(ModelportError):
    """The management API is switched off."""

    status = 403
    kind = "forbidden"


class NotFound(ModelportError):
    """Unknown model or version."""

    status = 404
    exit_code = 2
    kind = "not_found"


class _RetryLater(ModelportError):
    status = 503

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; never advertise 0, clients treat it as "hammer now".
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class Overloaded(_RetryLater):
    """The model's queue is full: refused at once, nothing queued."""

    kind = "overloaded"


class Unavailable(_RetryLater):
    """Model still loading, or the server is draining."""

    kind = "unavailable"


class QuotaExceeded(_RetryLater):
    """The tenant is over its quota (requests per second, or requests in flight): refused before
    its body was read, with the time until the quota allows another."""

    status = 429
    kind = "quota_exceeded"


class DeadlineExceeded(ModelportError):
    """The request's deadline passed before compute started; no compute was spent."""

    status = 504
    kind = "deadline_exceeded"


class ServerUnreachable(ModelportError):
    """A client's: no connection to the server (nothing listens at the address, or it went away
    mid-request). Client-side discovery fails over on it."""

    status = 503
    kind = "unreachable"


class BundleError(ModelportError):
    """A model bundle on disk is invalid. The message names the file and the problem."""

    exit_code = 2
    kind = "bad_bundle"


class MissingExtra(ModelportError):
    """An optional dependency is not installed; the message says how to install it."""

    exit_code = 2
    kind = "missing_extra"
