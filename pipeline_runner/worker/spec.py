"""What a worker process is told to be: the :class:`WorkerSpec` the deployment sends on stdin."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..config import DataPlaneConfig, OperatorConfig, TracingConfig
from ..nats_security import NatsClientOptions
from ..placement import Device


class WorkerSpec(BaseModel):
    """Everything a worker process needs to know, sent by the deployment on stdin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str
    operator: OperatorConfig
    data_plane: DataPlaneConfig = DataPlaneConfig()
    index: int
    nats_url: str
    nats: NatsClientOptions = NatsClientOptions()
    root: str
    log_level: str = "INFO"
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    parent_pid: int | None = None
    #: Where the deployment placed this worker (its operator's ``device`` resolved).
    device: Device = "cpu"
    #: The deployment's CUDA number of this worker's GPU; the worker itself sees it as device 0.
    gpu: int | None = None
    #: Where this worker writes its Prometheus values (the deployment serves them); None: off.
    metrics_dir: str | None = None
    #: The deployment's tracing section, its ``file`` made absolute.
    tracing: TracingConfig = TracingConfig()

    @property
    def worker_id(self) -> str:
        return f"{self.operator.name}.{self.index}"
