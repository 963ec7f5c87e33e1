"""The Operator interface: what a pipeline stage implements.

An operator receives a batch of :class:`Request` objects and answers each with zero or more
responses, the last one marked final. The worker answers for it if it forgets or raises, so a
request never goes unanswered.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import BadInputError, OperatorError
from .kernels.xp import to_device
from .protocol import ErrorInfo
from .tensor import Tensor, TensorLike

if TYPE_CHECKING:
    from .data_plane.plane import DataPlane
    from .reply import Reply
    from .tracing.spans import RequestTrace


@dataclass(frozen=True)
class OperatorContext:
    """What an operator knows about where it runs.

    ``device`` is where the deployment placed this worker (its ``device`` resolved: ``auto``
    became ``cpu`` or ``gpu``). Write array code once against :attr:`xp`: inputs from
    ``request.array`` already live there, and CuPy results sent in a response stay on the GPU.
    """

    deployment: str
    operator: str
    version: int
    worker: str
    parameters: dict[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("operator"))
    device: Literal["cpu", "gpu"] = "cpu"
    #: The deployment's CUDA number of this worker's GPU (None on the CPU); in this process the
    #: GPU is device 0, the only one visible.
    gpu: int | None = None

    @property
    def xp(self) -> ModuleType:
        """The array module of this worker's device: ``cupy`` on a GPU worker, else ``numpy``."""
        if self.device == "gpu":
            import cupy  # only GPU workers import CuPy

            return cupy
        return np

    def to_device(self, array: Any) -> Any:
        """``array`` on this worker's device (a no-op when already there; zero-copy via DLPack
        where the producer allows, e.g. a PyTorch CUDA tensor onto a GPU worker)."""
        return to_device(array, self.device)


class Request:
    """One request as an operator sees it."""

    def __init__(
        self,
        request_id: str,
        parameters: dict[str, Any],
        inputs: dict[str, Tensor],
        deadline: float,
        reply: Reply,
        device: Literal["cpu", "gpu"] = "cpu",
        trace: RequestTrace | None = None,
    ):
        self.id = request_id
        self.parameters = parameters
        self.inputs = inputs
        self.deadline = deadline  # time.monotonic() value
        #: The serving worker's device: where :meth:`array` puts inputs by default.
        self.device = device
        #: The caller's trace context, when tracing is on (the worker continues the trace).
        self.trace = trace
        self._reply = reply
        self._final_sent = False
        self._cancelled = False
        #: ``ok``, or the error code of the final response; None until it is sent.
        self.outcome: str | None = None

    @property
    def cancelled(self) -> bool:
        """True once the caller gave up on this request (cancelled it, or its deadline passed).

        A worker serving one request at a time also cancels the task running ``execute``, so
        awaiting operators stop at their next ``await``; batch operators can check this flag.
        """
        return self._cancelled

    def cancel(self) -> None:
        """Mark the request as given up by its caller (the worker calls this)."""
        self._cancelled = True

    @property
    def answered(self) -> bool:
        """True once the final response (or error) has been sent."""
        return self._final_sent

    def time_left(self) -> float:
        """Seconds until the caller stops waiting."""
        return max(0.0, self.deadline - time.monotonic())

    async def array(self, name: str, memory_type: str | None = None) -> Any:
        """The input ``name`` on this worker's device, or on ``memory_type`` (``'cpu'``/``'gpu'``).

        On a GPU worker that is a CuPy array: a tensor another GPU published is fetched straight
        into device memory, host bytes are copied to the device once. Byte and string tensors
        stay NumPy arrays (CuPy has no such dtypes). A missing input is a BadInputError.
        """
        tensor = self.inputs.get(name)
        if tensor is None:
            have = ", ".join(sorted(self.inputs)) or "none"
            raise BadInputError(f"missing input {name!r} (inputs given: {have})")
        if memory_type is None:
            memory_type = self.device if _numeric(tensor.dtype) else "cpu"
        return await tensor.array(memory_type)

    async def respond(
        self,
        outputs: Mapping[str, TensorLike] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        final: bool = True,
    ) -> None:
        """Send a response; several non-final ones may precede the final one.

        If sending fails (e.g. the response exceeds the payload limit) the request stays
        unanswered, so the worker can still answer it with the error.
        """
        self._check_open()
        await self._reply.send(outputs or {}, parameters or {}, final)
        self._final_sent = final
        if final:
            self.outcome = "ok"

    async def fail(self, message: str, code: str = "operator_failed") -> None:
        """Answer the request with an error; this is its final response."""
        self._check_open()
        await self._reply.fail(ErrorInfo(code=code, message=message))
        self._final_sent = True
        self.outcome = code

    def _check_open(self) -> None:
        if self._final_sent:
            raise RuntimeError(f"request {self.id} already has its final response")


def _numeric(dtype: Any) -> bool:
    """True for dtypes CuPy arrays can hold: not variable-length 'bytes'/'string', text or objects.

    ``dtype`` is a NumPy dtype, or a remote tensor's dtype string (``'<f4'``, ``'bytes'``).
    """
    if isinstance(dtype, str) and dtype in ("bytes", "string"):
        return False
    try:
        return np.dtype(dtype).kind in "biufc"
    except TypeError:
        return False


class Response:
    """One response received from an operator."""

    def __init__(
        self,
        request_id: str,
        outputs: dict[str, Tensor],
        parameters: dict[str, Any],
        final: bool,
        worker: str | None,
        data_plane: DataPlane | None = None,
        attempt: int = 1,
    ):
        self.request_id = request_id
        self.outputs = outputs
        self.parameters = parameters
        self.final = final
        self.worker = worker
        #: Which delivery produced it: above 1 when a worker died holding the request.
        self.attempt = attempt
        self._data_plane = data_plane

    def release(self) -> None:
        """Let the producers free this response's data-plane tensors now, not at their lease's end.

        Inside an operator this happens by itself when the request being served finishes.
        """
        remote = [t.descriptor for t in self.outputs.values() if t.descriptor is not None]
        if remote and self._data_plane is not None:
            self._data_plane.release(remote)

    async def array(self, name: str, memory_type: str = "cpu") -> Any:
        """The output ``name`` (NumPy, or CuPy for ``'gpu'``)."""
        tensor = self.outputs.get(name)
        if tensor is None:
            have = ", ".join(sorted(self.outputs)) or "none"
            raise OperatorError("response", "missing_output", f"no output {name!r} (outputs: {have})")
        return await tensor.array(memory_type)


class Operator(ABC):
    """Base class of Python operators. Subclass it and implement :meth:`execute`."""

    def __init__(self, context: OperatorContext):
        self.context = context

    @property
    def parameters(self) -> dict[str, Any]:
        """The operator's ``parameters`` from the deployment file."""
        return self.context.parameters

    @property
    def logger(self) -> logging.Logger:
        return self.context.logger

    async def setup(self) -> None:
        """Called once in the worker before it serves requests (load models, open handles)."""

    @abstractmethod
    async def execute(self, requests: list[Request]) -> None:
        """Answer every request in ``requests``; each gets a final response or an error.

        Raise :class:`~pipeline_runner.errors.BadInputError` for input the operator cannot take;
        any other exception fails the unanswered requests of the batch with its message.
        """

    async def teardown(self) -> None:
        """Called once when the worker stops, after in-flight requests finished."""

    def stats(self) -> dict[str, Any]:
        """Operator-specific counters or facts, reported with the worker's (``runner status``)."""
        return {}
