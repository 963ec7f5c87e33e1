"""``kind: triton`` operators: a Triton model served by a Triton server the worker owns."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from ..config import OperatorConfig
from ..errors import BadInputError, OperatorError, RunnerError
from ..metrics.observers import TritonMetrics
from ..operator import Operator, OperatorContext, Request
from .environment import setup_triton
from .model_config import merged_model_config, read_model_config, to_json
from .server import TritonServer
from .shared_memory import SHM_THRESHOLD_BYTES, Region, SharedMemoryPool

log = logging.getLogger(__name__)


def _tensor_types(specs: Any) -> dict[str, str]:
    """name -> Triton datatype ('INT32', 'FP32', 'BYTES', ...) of a config's inputs or outputs."""
    return {spec.name: _datatype(spec.data_type) for spec in specs}


def _datatype(config_type: int) -> str:
    # The config says TYPE_STRING where the inference protocol says BYTES.
    name = model_config_pb2.DataType.Name(config_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _triton_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Request parameters as Triton takes them: bool, int, float and str (others as JSON text)."""
    return {
        key: value if isinstance(value, bool | int | float | str) else json.dumps(value)
        for key, value in parameters.items()
    }


class TritonOperator(Operator):
    """Forwards each request to a model on the worker's own Triton server.

    Inputs and outputs are matched by name and dtype with the model's config; a decoupled
    model's responses stream back as the request's responses.
    """

    def __init__(
        self, context: OperatorContext, config: OperatorConfig, root: Path, metrics: TritonMetrics | None = None
    ):
        super().__init__(context)
        self.metrics = metrics
        assert config.repository is not None
        self.config = config
        self.repository = (root / config.repository).resolve()
        self.model = config.model or config.name
        self.model_version = str(config.model_version or "")
        self.server: TritonServer | None = None
        self.shared_memory: SharedMemoryPool | None = None
        self.inputs: dict[str, str] = {}
        self.outputs: dict[str, str] = {}
        self.decoupled = False
        self.instance_groups: list[dict[str, Any]] = []
        self.model_parameters: dict[str, str] = {}

    async def setup(self) -> None:
        installation = await asyncio.to_thread(setup_triton, progress=log.info)
        config_file = self.repository / self.model / "config.pbtxt"
        override = None
        if self.config.config_overrides:
            override = to_json(merged_model_config(config_file, self.config.config_overrides))
        self.server = TritonServer(installation, self.repository)
        await self.server.start()
        try:
            await self.server.load_model(self.model, override)
            assert self.server.client is not None
            loaded = await self.server.client.get_model_config(self.model, self.model_version)
        except BaseException:
            await self.server.stop()
            raise
        assert self.server.client is not None
        self.shared_memory = SharedMemoryPool(self.server.client)
        model_config = loaded.config
        self.instance_groups = [
            {"count": group.count, "kind": model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)}
            for group in model_config.instance_group
        ]
        self.model_parameters = {key: value.string_value for key, value in model_config.parameters.items()}
        self.inputs = _tensor_types(model_config.input)
        self.outputs = _tensor_types(model_config.output)
        self.decoupled = model_config.model_transaction_policy.decoupled
        log.info("serving Triton model %s (inputs %s, outputs %s%s)", self.model, self.inputs,
                 self.outputs, ", decoupled" if self.decoupled else "")

    def stats(self) -> dict[str, Any]:
        """What the worker's Triton server reports for the loaded model."""
        return {
            "triton_url": self.server.url if self.server else None,
            "model": self.model,
            "instance_group": self.instance_groups,
            "parameters": self.model_parameters,
            "decoupled": self.decoupled,
            "shared_memory_regions": self.shared_memory.regions if self.shared_memory else 0,
        }

    async def teardown(self) -> None:
        if self.shared_memory is not None:
            await self.shared_memory.close()
        if self.server is not None:
            await self.server.stop()

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            regions: list[Region] = []
            finished = False
            try:
                inputs = [await self._input(request, name, dtype, regions) for name, dtype in self.inputs.items()]
                await self._infer(request, inputs)
                finished = True
            finally:
                for region in regions:
                    assert self.shared_memory is not None
                    # After a cancelled call Triton may still be reading: never reuse that region.
                    await self.shared_memory.release(region, reuse=finished)

    async def _infer(self, request: Request, inputs: list[grpcclient.InferInput]) -> None:
        outputs = [grpcclient.InferRequestedOutput(name) for name in self.outputs]
        parameters = _triton_parameters(request.parameters)
        started = time.monotonic()
        try:
            if self.decoupled:
                await self._stream(request, inputs, outputs, parameters)
            else:
                result = await self._client.infer(
                    self.model, inputs, self.model_version, outputs=outputs, parameters=parameters or None,
                    client_timeout=max(request.time_left(), 0.001),
                )  # fmt: skip
                await request.respond(self._arrays(result))
        except InferenceServerException as exc:
            raise OperatorError(self.context.operator, "operator_failed", f"Triton: {exc.message()}") from None
        finally:
            if self.metrics is not None:
                self.metrics.call_finished(time.monotonic() - started)

    @property
    def _client(self) -> grpcclient.InferenceServerClient:
        if self.server is None or self.server.client is None:
            raise RunnerError("the Triton server is not running")
        return self.server.client

    async def _input(
        self, request: Request, name: str, datatype: str, regions: list[Region]
    ) -> grpcclient.InferInput:
        if name not in request.inputs:
            raise BadInputError(f"missing input {name!r} (model {self.model!r} takes {', '.join(self.inputs)})")
        # Host memory whatever the worker's device: Triton takes inputs over gRPC or shared memory.
        array = np.ascontiguousarray(await request.array(name, "cpu"))
        expected = triton_to_np_dtype(datatype)
        if array.dtype != expected and datatype != "BYTES":
            raise BadInputError(f"input {name!r} must be {np.dtype(expected)} ({datatype}), got {array.dtype}")
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if array.nbytes >= SHM_THRESHOLD_BYTES and datatype != "BYTES" and self.shared_memory is not None:
            region = await self.shared_memory.acquire(array.nbytes)
            regions.append(region)
            region.write(array)
            tensor.set_shared_memory(region.name, array.nbytes)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def _arrays(self, result: Any) -> dict[str, np.ndarray]:
        arrays = {}
        for name in self.outputs:
            array = result.as_numpy(name)
            if array is not None:
                arrays[name] = array
        return arrays

    async def _stream(self, request: Request, inputs: list[Any], outputs: list[Any], parameters: dict[str, Any]) -> None:
        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.model, "model_version": self.model_version, "inputs": inputs,
                "outputs": outputs, "parameters": parameters or None, "enable_empty_final_response": True,
            }  # fmt: skip

        # Each response is held back until the next arrives, so that the last one with data
        # goes out as the final response (Triton ends a stream with an empty final one).
        pending: dict[str, np.ndarray] | None = None
        stream = self._client.stream_infer(one_request(), stream_timeout=max(request.time_left(), 0.001))
        async for result, error in stream:
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                if pending is not None:
                    await request.respond(pending, final=False)
                pending = self._arrays(result)
            if response.parameters["triton_final_response"].bool_param:
                break
        await request.respond(pending or {}, final=True)


def create_triton_operator(
    context: OperatorContext, config: OperatorConfig, root: Path, metrics: TritonMetrics | None = None
) -> TritonOperator:
    """The operator a worker runs for ``kind: triton``; checks the repository first."""
    assert config.repository is not None
    repository = (root / config.repository).resolve()
    model = config.model or config.name
    if not (repository / model).is_dir():
        raise RunnerError(f"operator {config.name!r}: no model {model!r} in Triton model repository {repository}")
    if config.config_overrides:
        read_model_config(repository / model / "config.pbtxt")  # a clear error before Triton starts
    return TritonOperator(context, config, root, metrics)
