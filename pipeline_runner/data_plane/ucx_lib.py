"""ucxx's low-level API, imported on first use, and the UCX settings the data plane runs with.

Importing this module does not import ucxx, which is slow (it loads libucx and probes for GPUs);
``load()`` does. The transport uses ``ucxx._lib.libucxx`` directly, not ucxx's asyncio layer.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from .errors import DataPlaneError

# UCX reads its configuration from the environment when a context is created, so these are
# set at import, before ``load()`` imports ucxx; setdefault lets a user's own setting win.
# - UCX_TLS=^cma. Between processes of one host UCX would move large messages with cma
#   (process_vm_readv by the receiver), but without endpoint error handling (which rules out
#   every shared-memory transport, see peers.py) a cma read from a producer that died
#   mid-transfer is fatal: UCX aborts the *consumer* process ("cma_ep.c process_vm_readv(...)
#   returned -1: No such process", then SIGABRT). Without cma, large messages are pipelined
#   through sysv shared memory (copy in, copy out), where a dead peer only stops the pipeline,
#   at a cost in bandwidth that RESULTS.md records. Tcp (other hosts) is unaffected.
os.environ.setdefault("UCX_TLS", "^cma")
# - ucxx sets UCX_MEMTYPE_CACHE=n, which this UCX (1.21) no longer knows: without this every
#   process prints "UCX WARN unused environment variable" (on stdout) when the transport starts.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# Not set: UCXPY_PROGRESS_MODE, read only by ucxx's asyncio layer, which the data plane does
# not use (progress.py drives the worker).


@dataclass(frozen=True)
class UcxLib:
    """The parts of ucxx the transport uses."""

    api: Any  # ucxx._lib.libucxx
    array: Any  # ucxx._lib.arr.Array: wraps a buffer (NumPy, CuPy, ...) for ucxx
    tag: Any  # ucxx._lib.libucxx.UCXXTag: makes a tag from an int

    def create_worker(self, host: str) -> tuple[Any, Any]:
        """(context, worker) with tag messages and wakeups, networking through ``host``'s
        interface unless UCX_NET_DEVICES says otherwise. Raises DataPlaneError."""
        options = {}
        if "UCX_NET_DEVICES" not in os.environ:
            device = net_device_for(host)
            if device is not None:
                options["NET_DEVICES"] = device
        try:
            context = self.api.UCXContext(options, feature_flags=(self.api.Feature.TAG, self.api.Feature.WAKEUP))
            worker = self.api.UCXWorker(context)
        except Exception as exc:
            raise DataPlaneError(f"cannot start UCX: {exc}") from exc
        return context, worker


_loaded: UcxLib | None = None


def loaded() -> UcxLib | None:
    """ucxx if ``load()`` already imported it, else None."""
    return _loaded


def load() -> UcxLib:
    """Import ucxx (blocking; run it in a thread from a loop). Raises ImportError."""
    global _loaded
    if _loaded is None:
        import ucxx._lib.libucxx as ucx_api
        from ucxx._lib.arr import Array

        _loaded = UcxLib(ucx_api, Array, ucx_api.UCXXTag)
    return _loaded


def net_device_for(host: str) -> str | None:
    """The interface that has address ``host`` (for UCX_NET_DEVICES); None for every interface."""
    if host in ("", "0.0.0.0", "::", "*"):
        return None
    try:
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise DataPlaneError(f"data plane host {host!r} does not resolve: {exc}") from exc
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    raise DataPlaneError(f"data plane host {host!r} ({ip}) is not an address of this machine")
