"""Worker processes: each loads one operator and serves its subject on the request plane.

* :mod:`.spec`: :class:`WorkerSpec`, what the deployment tells a worker on stdin;
* :mod:`.process`: the process around it (``python -m pipeline_runner.worker``): status reports,
  signals, its connections, the inbound for its delivery mode, the stats and cancel subjects;
* :mod:`.serving`: :class:`Worker`, the serving loop (admission, batching, cancellation,
  redelivery policy, error mapping), which knows requests only as deliveries and replies.
"""

from ..process import STATUS_FD_ENV
from .process import main, run_worker
from .serving import Worker
from .spec import WorkerSpec

__all__ = ["STATUS_FD_ENV", "Worker", "WorkerSpec", "main", "run_worker"]
