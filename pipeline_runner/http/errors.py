"""What the HTTP front door answers for each failure: the one place errors become statuses.

Every error is a JSON body ``{"error": {"code": ..., "message": ...}}``. ``code`` is the
operator's own error code where there is one (``bad_input``, ``overloaded``, ``worker_lost``...),
else one of the ingress's (``bad_json``, ``not_found``, ``timeout``...).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from ..data_plane.errors import DataPlaneError
from ..errors import OperatorError, PayloadTooLargeError, ProtocolError, RequestTimeoutError, RunnerError

#: HTTP status of each error code; a code not listed is a 500.
STATUS_OF_CODE: dict[str, HTTPStatus] = {
    # the request is wrong
    "bad_json": HTTPStatus.BAD_REQUEST,
    "bad_tensor": HTTPStatus.BAD_REQUEST,
    "bad_request": HTTPStatus.BAD_REQUEST,
    "bad_input": HTTPStatus.BAD_REQUEST,
    "unauthorized": HTTPStatus.UNAUTHORIZED,
    "not_found": HTTPStatus.NOT_FOUND,
    "unknown_operator": HTTPStatus.NOT_FOUND,
    "unknown_request": HTTPStatus.NOT_FOUND,
    "method_not_allowed": HTTPStatus.METHOD_NOT_ALLOWED,
    "body_timeout": HTTPStatus.REQUEST_TIMEOUT,
    "cancelled": HTTPStatus.CONFLICT,
    "too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "unsupported_media_type": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    # the pipeline cannot take it now
    "overloaded": HTTPStatus.TOO_MANY_REQUESTS,
    "worker_lost": HTTPStatus.SERVICE_UNAVAILABLE,
    "no_worker": HTTPStatus.SERVICE_UNAVAILABLE,
    "not_accepted": HTTPStatus.SERVICE_UNAVAILABLE,
    "timeout": HTTPStatus.GATEWAY_TIMEOUT,
    # the pipeline failed
    "operator_failed": HTTPStatus.INTERNAL_SERVER_ERROR,
    "no_response": HTTPStatus.INTERNAL_SERVER_ERROR,
    "bad_output": HTTPStatus.INTERNAL_SERVER_ERROR,
    "data_plane": HTTPStatus.BAD_GATEWAY,
    "internal": HTTPStatus.INTERNAL_SERVER_ERROR,
}
#: Seconds a client is asked to wait before retrying (Retry-After) on these statuses.
RETRY_AFTER_S = {HTTPStatus.TOO_MANY_REQUESTS: 1, HTTPStatus.SERVICE_UNAVAILABLE: 1}


class HttpError(Exception):
    """A failure to answer with ``status`` and ``{"error": {"code", "message"}}``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> HTTPStatus:
        return STATUS_OF_CODE.get(self.code, HTTPStatus.INTERNAL_SERVER_ERROR)

    def headers(self) -> list[tuple[bytes, bytes]]:
        retry = RETRY_AFTER_S.get(self.status)
        return [(b"retry-after", str(retry).encode())] if retry is not None else []

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()


def http_error(exc: BaseException) -> HttpError:
    """The HTTP error for any exception a call to the pipeline raised."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, OperatorError):
        return HttpError(exc.code, exc.message)
    if isinstance(exc, RequestTimeoutError):
        # With at_most_once delivery, "nobody serves the subject" is known before the deadline.
        code = "no_worker" if "no worker is serving" in str(exc) else "timeout"
        return HttpError(code, str(exc))
    if isinstance(exc, PayloadTooLargeError):
        return HttpError("too_large", str(exc))
    if isinstance(exc, DataPlaneError):
        return HttpError("data_plane", str(exc))
    if isinstance(exc, ProtocolError):
        return HttpError("internal", f"a response could not be decoded: {exc}")
    if isinstance(exc, RunnerError):
        return HttpError("internal", str(exc))
    return HttpError("internal", f"{type(exc).__name__}: {exc}")
