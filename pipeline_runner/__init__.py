"""pipeline_runner: multi-step inference pipelines over a NATS request plane."""

from .config import DeploymentConfig, OperatorConfig
from .errors import (
    BadInputError,
    ConfigError,
    OperatorError,
    OperatorTimeoutError,
    PayloadTooLargeError,
    ProtocolError,
    RequestTimeoutError,
    RunnerError,
    WorkerStartError,
)
from .operator import Operator, OperatorContext, Request, Response
from .remote import Connection, RemoteOperator
from .python_first import OperatorHandle, depends, endpoint, operator_defaults
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
    "OperatorHandle",
    "OperatorTimeoutError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteOperator",
    "Request",
    "RequestTimeoutError",
    "Response",
    "RunnerError",
    "Tensor",
    "WorkerStartError",
    "depends",
    "endpoint",
    "operator_defaults",
]
__version__ = "0.1.0"
