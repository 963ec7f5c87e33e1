"""Prometheus metrics: what every worker, ingress and the deployment itself measure.

- :mod:`.definitions`: every metric's name, help and labels, in one place.
- :mod:`.observers`: the small typed objects the serving loop, the data plane, the Triton
  operator and the HTTP ingress call (``request_finished(...)``); no other module imports
  ``prometheus_client``.
- :mod:`.server`: the one ``/metrics`` endpoint of a deployment, served by the deployment
  process from the files its child processes write (prometheus-client's multiprocess mode).
"""

#: The environment variable prometheus-client's multiprocess mode reads in every child process.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
