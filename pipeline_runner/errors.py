"""Exceptions users of pipeline_runner can catch."""

from __future__ import annotations


class RunnerError(Exception):
    """Base class of every error pipeline_runner raises on purpose."""


class ConfigError(RunnerError):
    """A deployment file is unreadable or invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ProtocolError(RunnerError):
    """A message on the request plane could not be decoded.

    ``code`` is the error code a worker answers such a request with.
    """

    code = "bad_request"


class RequestTooLargeError(ProtocolError):
    """A request's tensors add up to more than its operator's ``max_request_bytes``."""

    code = "too_large"


class PayloadTooLargeError(RunnerError):
    """A message would exceed the request plane's maximum payload."""


class RequestTimeoutError(RunnerError, TimeoutError):
    """A request got no final response before its deadline."""


class OperatorError(RunnerError):
    """The operator answered a request with an error.

    ``code`` is a short machine-readable kind (e.g. ``bad_input``, ``operator_failed``).
    """

    def __init__(self, operator: str, code: str, message: str):
        self.operator = operator
        self.code = code
        self.message = message
        super().__init__(f"{operator}: {code}: {message}")


class OperatorTimeoutError(OperatorError, RequestTimeoutError):
    """A downstream operator answered ``timeout``: the request's deadline passed while it was
    served. Caught as :class:`RequestTimeoutError` too, like the caller's own timeout."""


def operator_error(operator: str, code: str, message: str) -> OperatorError:
    """The exception for an error response with ``code`` from ``operator``."""
    cls = OperatorTimeoutError if code == "timeout" else OperatorError
    return cls(operator, code, message)


class BadInputError(RunnerError):
    """Raised by operator code for a request it cannot process (wrong dtype, shape, missing input).

    The worker answers the request with error code ``bad_input`` and keeps serving.
    """


class WorkerStartError(RunnerError):
    """A worker process failed to start (import error, setup error, NATS unreachable)."""
