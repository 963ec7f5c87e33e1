"""pipeline_runner: multi-step inference pipelines over a NATS request plane."""

from .config import DeploymentConfig, OperatorConfig
from .errors import (
    BadInputError,
    ConfigError,
    OperatorError,
    PayloadTooLargeError,
    ProtocolError,
    RequestTimeoutError,
    RunnerError,
    WorkerStartError,
)
from .operator import Operator, OperatorContext, Request, Response
from .remote import Connection, RemoteOperator
from .tensor import Tensor

__all__ = [
    "BadInputError",
    "ConfigError",
    "Connection",
    "DeploymentConfig",
    "Operator",
    "OperatorConfig",
    "OperatorContext",
    "OperatorError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteOperator",
    "Request",
    "RequestTimeoutError",
    "Response",
    "RunnerError",
    "Tensor",
    "WorkerStartError",
]
__version__ = "0.1.0"
