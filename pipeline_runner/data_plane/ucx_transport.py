"""Point-to-point byte transfer between processes over UCX (ucxx), for the data plane.

``UcxTransport`` moves the bytes of one buffer from the process that holds it (the producer)
into a preallocated buffer of another process (the consumer). It knows nothing about operators,
NATS or dtypes: a producer serves whatever its ``lookup(tensor_id)`` returns, and a consumer asks
``fetch(address, tensor_id, out, timeout_s)``. ucxx is imported by ``start()``, not here.

Design, chosen by measurement (2 cores, no GPU; benchmarks/ucx_raw.py compares with plain ucxx):

* One UCX context and worker per transport, through ucxx's low-level API (``ucxx._lib.libucxx``),
  not its asyncio layer. The address is the worker address plus the identity of the owning
  process (boot id, pid namespace, pid, start time). Endpoints are created from worker addresses
  (``create_from_worker_address``), cached per peer and used in both directions: between
  processes of one host UCX then moves data through shared memory (sysv), across hosts over tcp.
  Rejected by the numbers: a listener + ``create_endpoint`` always goes over tcp (0.6-1.0 GiB/s
  at 1-256 MiB in ucxx's thread mode, 2.0-2.4 in polling mode), and so does any endpoint with UCX
  error handling (``UCP_ERR_HANDLING_MODE_PEER`` makes every shared-memory transport
  unreachable: 2 GiB/s instead of 11-12 at 16 MiB). Active messages: 8.0 / 6.3 / 2.1 GiB/s at
  1 / 16 / 256 MiB against 16.8 / 12.5 / 4.8-6.2 for tag send/recv (the receiver allocates the
  buffer and a copy into ``out`` follows).
* Tag protocol: the consumer sends a control message (its address, the tensor id, the size it
  expects, a reply tag ``2k``) to the producer's control tag and posts two receives on its
  endpoint to the producer: the payload straight into ``out`` (tag ``2k+1``) and a status
  (tag ``2k``). The producer answers with the payload when it can serve it, else with a status
  (unknown id, size mismatch; or OK for an empty tensor); whichever arrives cancels the other.
* Progress runs on the event loop, without a thread. The worker is polled between the loop's
  other tasks until ``_LINGER_S`` passes without a completion (also while requests of ours are
  in flight: see ``_LINGER_S``); then it is armed and the loop sleeps on its epoll descriptor,
  so an idle transport costs no CPU. Completions run callbacks directly. Measured with the same
  exchange (no cma; 1 / 16 / 256 MiB GiB/s, 1 KiB round trip, idle CPU of consumer / producer):
  this scheme 8.4 / 11.6 / 7.3, 22 us, 0 % / 0 % (without lingering: 4.3 / 10.6 / 7.6, 55 us);
  ucxx's ``polling`` mode 9.3 / 11.9 / 7.5, 17 us, 100 % / 100 %; ``thread`` mode 1.6 / 4.3 /
  3.2, 108 us, and a receive waiting for requests spins the loop (1 % / 101 %); ``thread`` with
  Python futures 2.2 / 8.8 / 7.4, 170 us, 2 % / 3 %.
* Peer death: endpoints between processes of one host cannot have UCX error handling (see
  above), so the transport watches the peer process itself through a pidfd: when it exits, what
  is in flight with it fails at once and its endpoint is dropped. Peers on other hosts (or in
  another pid namespace) get endpoints with UCX error handling, over tcp. Every fetch also has
  its own deadline; a live peer that misses it keeps its endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import DataPlaneError

# UCX reads its configuration from the environment when a context is created, so these are
# set here, before ``start()`` imports ucxx; setdefault lets a user's own setting win.
# - UCX_TLS=^cma. Between processes of one host UCX would move large messages with cma
#   (process_vm_readv by the receiver), but without endpoint error handling (which rules out
#   every shared-memory transport, see above) a cma read from a producer that died mid-transfer
#   is fatal: UCX aborts the *consumer* process ("cma_ep.c process_vm_readv(...) returned -1: No
#   such process", then SIGABRT). Without cma, large messages are pipelined through sysv shared
#   memory (copy in, copy out), where a dead peer only stops the pipeline. Plain ucxx between
#   two processes, 1 / 16 / 256 MiB: with cma 16.8 / 12.5 / 4.8-6.2 GiB/s, without 11.5 / 12.1 /
#   7.4 GiB/s (both processes copy, in parallel). Tcp (other hosts) is unaffected.
os.environ.setdefault("UCX_TLS", "^cma")
# - ucxx sets UCX_MEMTYPE_CACHE=n, which this UCX (1.21) no longer knows: without this every
#   process prints "UCX WARN unused environment variable" (on stdout) when the transport starts.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# Not set: UCXPY_PROGRESS_MODE, read only by ucxx's asyncio layer, which this module does not
# use (``_Progress`` drives the worker).

log = logging.getLogger(__name__)

_ADDRESS_PREFIX = "ucx1"
_MAGIC = b"PRDP"
_VERSION = 1
_OP_FETCH = 1
_OP_RELEASE = 2
_OK, _UNKNOWN, _SIZE_MISMATCH, _FAILED = 0, 1, 2, 3

# Control messages go to this tag on the producer's worker; reply tags have the top bit clear.
_CTRL_TAG = 0xD47A_C7A1_0000_0001
# magic, version, op, len(requester address), len(payload), timeout ms, reply tag, nbytes
_CTRL = struct.Struct("<4sBBHIIQQ")
_CTRL_MAX = 16384
_MAX_ID_BYTES = 4096
# magic, version, status code, len(message), producer's nbytes
_STATUS = struct.Struct("<4sBBHQ")
_STATUS_MAX = 1024

# Keep polling this long after the last completion before sleeping on the epoll descriptor:
# the next message of an exchange usually follows within microseconds, and a wakeup from epoll
# costs ~30 us here (8-byte round trip 54 us without lingering, 22 us with 200 us).
# Also while our own requests are pending: a process that polls until its peer answers keeps
# the CPU the peer was woken on, and the peer waits for the scheduler to move it. Measured on
# 2 cores, 128 KiB fetches between processes idle 10 ms in between: 9.5 ms each when the
# consumer polled until done, 1.4 ms when it sleeps after 200 us; hello_world with 128 KiB
# inputs, concurrency 8: 145 -> 227-246 req/s (1 MiB: 96 -> 135), concurrency 1: 72 -> 136.
_LINGER_S = 200e-6
# Longest stretch the worker is progressed without letting the loop's other tasks run.
# (``worker.progress()`` would copy a whole 256 MiB message, 42 ms, in one call.)
_PROGRESS_BUDGET_S = 1e-3
# While requests are pending, progress the worker at least this often even without an event
# (against a lost wakeup; ucxx's blocking mode does the same every second).
_SAFETY_TICK_S = 0.5
# A producer gives up on a send this long after the consumer's own deadline passed.
_SERVE_GRACE_S = 2.0
# Receives still posted to a peer that exited are dropped (cancelled) this long after.
_ORPHAN_GRACE_S = 2.0

_NEVER_DROPPED: list[Any] = []  # see _Progress.keep
_ucx: Any = None  # ucxx._lib.libucxx, imported by the first start()
_Array: Any = None  # ucxx._lib.arr.Array


def _import_ucxx() -> None:
    """Import ucxx: about 0.5 s (it loads libucx and probes for GPUs), hence only in start()."""
    global _ucx, _Array
    if _ucx is None:
        import ucxx._lib.libucxx as ucx_api
        from ucxx._lib.arr import Array

        _Array = Array
        _ucx = ucx_api


Callback = Callable[[BaseException | None], None]


class UcxTransport:
    """Serves local buffers to peers and fetches peers' buffers, over UCX.

    ``lookup(tensor_id)`` returns the buffer to serve for an id (a C-contiguous NumPy array,
    memoryview or bytes, or a device array with ``__cuda_array_interface__`` such as CuPy), or
    None when the id is unknown or freed. Device arrays go to ucxx as they are (this module
    never imports CuPy); UCX progresses on the event loop's thread, which must have their
    device's CUDA context current (CuPy makes it current when it allocates there).
    ``on_release(ids)`` is called when a consumer says it is done with ids (see ``release``).
    ``host`` is the address of the network interface that peers on other hosts reach this
    process through (tcp; "0.0.0.0": every interface); peers on this host use shared memory
    whatever it is.
    """

    def __init__(
        self,
        lookup: Callable[[str], Any | None],
        *,
        host: str = "127.0.0.1",
        on_release: Callable[[list[str]], None] | None = None,
    ):
        self._lookup = lookup
        self._host = host
        self._on_release = on_release
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: Any = None
        self._worker: Any = None
        self._progress: _Progress | None = None
        self._address: str | None = None
        self._address_bytes = b""
        self._local_identity: tuple[str, str] = ("", "")
        self._peers: dict[str, _Peer] = {}
        self._next_tag = 1
        self._stopped = False
        self._stats = {"bytes_served": 0, "fetches_served": 0, "bytes_fetched": 0, "fetches": 0}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the UCX worker and start answering peers (idempotent)."""
        if self._stopped:
            raise DataPlaneError("a stopped UcxTransport cannot be started again")
        if self._worker is not None:
            return
        loop = asyncio.get_running_loop()
        if _ucx is None:
            try:
                await asyncio.to_thread(_import_ucxx)  # the loop (and its NATS client) keeps running
            except ImportError as exc:
                raise DataPlaneError(f"the UCX data plane needs ucxx (pip install ucxx-cu12): {exc}") from exc
        if self._worker is not None or self._stopped:  # raced with another start() or stop()
            return
        options = {}
        if "UCX_NET_DEVICES" not in os.environ:
            device = _net_device_for(self._host)
            if device is not None:
                options["NET_DEVICES"] = device
        try:
            context = _ucx.UCXContext(options, feature_flags=(_ucx.Feature.TAG, _ucx.Feature.WAKEUP))
            worker = _ucx.UCXWorker(context)
            progress = _Progress(worker, loop)
        except Exception as exc:
            raise DataPlaneError(f"cannot start UCX: {exc}") from exc
        self._loop, self._context, self._worker, self._progress = loop, context, worker, progress
        self._local_identity = _host_identity()
        pid = os.getpid()
        worker_address = base64.urlsafe_b64encode(bytes(worker.address)).decode("ascii")
        self._address = ":".join(
            [_ADDRESS_PREFIX, *self._local_identity, str(pid), _start_time(pid) or "0", worker_address]
        )
        self._address_bytes = self._address.encode("ascii")
        self._post_control_recv()

    @property
    def address(self) -> str:
        """Where peers reach this transport: pass it to their ``fetch``/``release``."""
        if self._address is None:
            raise DataPlaneError("the UCX transport is not started")
        return self._address

    @property
    def stats(self) -> dict[str, int]:
        """Counters of completed transfers: bytes_served, fetches_served, bytes_fetched, fetches."""
        return dict(self._stats)

    async def stop(self) -> None:
        """Fail whatever is in flight, close every endpoint and the worker. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        stopped = DataPlaneError("the UCX transport was stopped")
        for peer in list(self._peers.values()):
            self._drop_peer(peer, stopped)
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.close()  # drops the remaining requests, which cancels them in UCX
        # Endpoints were closed above; the worker and the context go with their last reference.
        self._worker = None
        self._context = None

    # ----------------------------------------------------------------- consumer side

    async def fetch(self, address: str, tensor_id: str, out: Any, timeout_s: float) -> None:
        """Fill ``out`` with the bytes the peer at ``address`` serves for ``tensor_id``.

        ``out``: a writable C-contiguous NumPy (or CuPy) array of exactly the tensor's size.
        Raises DataPlaneError when the id is unknown or freed there, the sizes differ, the peer
        is gone or unreachable, or ``timeout_s`` passes. After a timeout (or a cancelled call)
        a late answer may still land in ``out``, which the transport keeps alive until then:
        do not reuse it.
        """
        progress = self._running()
        loop = self._loop
        assert loop is not None
        target, nbytes = _writable_buffer(out)
        if target is not None and target.cuda and not self._context.cuda_support:
            raise DataPlaneError("cannot fetch into a device array: this UCX has no CUDA support here")
        id_bytes = tensor_id.encode("utf-8")
        if len(id_bytes) > _MAX_ID_BYTES:
            raise DataPlaneError(f"tensor id is too long ({len(id_bytes)} bytes): {tensor_id[:64]!r}...")
        peer = self._peer(address)
        ep = peer.endpoint()
        tag = self._next_tag << 1
        self._next_tag += 1
        op = _Fetch(self, peer, tensor_id, nbytes, loop.create_future())
        ctrl = self._control(_OP_FETCH, tag, nbytes, timeout_s, id_bytes)
        try:
            # The request goes out first: the answer cannot come back before the two receives
            # are posted, and if it did, UCX would keep it (unexpected) until they are.
            op.ctrl_req = ep.tag_send(_Array(ctrl), _ucx.UCXXTag(_CTRL_TAG))
            op.status_req = ep.tag_recv(_Array(op.status), _ucx.UCXXTag(tag))
            op.data_req = ep.tag_recv(target, _ucx.UCXXTag(tag | 1)) if nbytes else None
        except Exception as exc:
            error = DataPlaneError(f"cannot reach {_describe(address)}: {exc}")
            self._drop_peer(peer, error)
            raise error from exc
        peer.ops.add(op)
        op.timer = loop.call_at(loop.time() + timeout_s, op.expire, timeout_s)
        if op.data_req is not None:
            progress.watch(op.data_req, op.on_data, keep=out)
        if op.status_req is not None:  # (None if the payload already completed and cancelled it)
            progress.watch(op.status_req, op.on_status, keep=op.status)
        progress.watch(op.ctrl_req, op.on_ctrl, keep=ctrl)
        # A cancelled caller leaves ``op`` to finish (or expire) through its callbacks; ``out``
        # stays referenced for as long as UCX may write into it.
        await op.future

    async def release(self, address: str, tensor_ids: list[str]) -> None:
        """Tell the producer at ``address`` these ids are no longer needed (fire and forget).

        Delivery is not confirmed; a peer that is gone is ignored. The producer's
        ``on_release`` callback receives the ids.
        """
        progress = self._running()
        if not tensor_ids:
            return
        try:
            ep = self._peer(address).endpoint()
        except DataPlaneError as exc:
            log.debug("not releasing %d tensors: %s", len(tensor_ids), exc)
            return
        for chunk in _chunks(tensor_ids, _CTRL_MAX - _CTRL.size - len(self._address_bytes)):
            ctrl = self._control(_OP_RELEASE, 0, 0, 0.0, json.dumps(chunk).encode("utf-8"))
            try:
                req = ep.tag_send(_Array(ctrl), _ucx.UCXXTag(_CTRL_TAG))
            except Exception as exc:
                log.debug("release to %s failed: %s", _describe(address), exc)
                return
            progress.watch(req, _log_failure, keep=ctrl, active=False)

    # ----------------------------------------------------------------- producer side

    def _post_control_recv(self) -> None:
        """Keep one receive posted on the control tag; handle messages as they complete."""
        while self._progress is not None:
            buf = np.empty(_CTRL_MAX, np.uint8)
            req = self._worker.tag_recv(_Array(buf), _ucx.UCXXTag(_CTRL_TAG))
            if not req.completed:
                self._progress.watch(req, lambda exc, buf=buf: self._on_control(buf, exc), keep=buf, active=False)
                return
            self._handle_control(buf, _error_of(req))  # it was already queued: no need to wait

    def _on_control(self, buf: np.ndarray, exc: BaseException | None) -> None:
        self._handle_control(buf, exc)
        self._post_control_recv()

    def _handle_control(self, buf: np.ndarray, exc: BaseException | None) -> None:
        if exc is not None:
            if self._progress is not None:
                log.warning("dropped a data-plane control message: %s", exc)
            return
        try:
            magic, version, op, addr_len, payload_len, timeout_ms, reply_tag, nbytes = _CTRL.unpack_from(buf)
            if magic != _MAGIC or version != _VERSION:
                log.warning("ignoring a data-plane control message of unknown format %r v%d", magic, version)
                return
            start = _CTRL.size
            requester = buf[start : start + addr_len].tobytes().decode("ascii")
            payload = buf[start + addr_len : start + addr_len + payload_len].tobytes()
            if op == _OP_FETCH:
                self._serve(requester, payload.decode("utf-8"), reply_tag, nbytes, timeout_ms)
            elif op == _OP_RELEASE:
                if self._on_release is not None:
                    self._on_release(json.loads(payload))
            else:
                log.warning("ignoring a data-plane control message with op %d", op)
        except Exception:
            log.exception("failed to handle a data-plane control message")

    def _serve(self, requester: str, tensor_id: str, reply_tag: int, nbytes: int, timeout_ms: int) -> None:
        try:
            peer = self._peer(requester)
            ep = peer.endpoint()
        except DataPlaneError as exc:
            log.debug("not serving %r: %s", tensor_id, exc)
            return
        code, message, buffer, served = self._resolve(tensor_id, nbytes)
        progress = self._progress
        assert progress is not None and self._loop is not None
        if code != _OK or not served:  # a status instead of the payload
            status = _STATUS.pack(_MAGIC, _VERSION, code, len(message), served) + message
            try:
                status_req = ep.tag_send(_Array(status), _ucx.UCXXTag(reply_tag))
            except Exception as exc:
                self._drop_peer(peer, DataPlaneError(f"cannot answer {_describe(requester)}: {exc}"))
                return
            progress.watch(status_req, _log_failure, keep=status, active=False)
            if code == _OK:
                self._stats["fetches_served"] += 1
            return
        try:
            data_req = ep.tag_send(buffer, _ucx.UCXXTag(reply_tag | 1))
        except Exception as exc:
            self._drop_peer(peer, DataPlaneError(f"cannot answer {_describe(requester)}: {exc}"))
            return
        send = _Send(self, peer, tensor_id, served)
        send.req = data_req
        send.timer = self._loop.call_later(timeout_ms / 1000 + _SERVE_GRACE_S, send.expire)
        peer.ops.add(send)
        # Active: the producer copies the payload in (sysv fragments, tcp), so it polls until done.
        progress.watch(data_req, send.on_sent, keep=buffer)

    def _resolve(self, tensor_id: str, nbytes: int) -> tuple[int, bytes, Any, int]:
        """(status code, message, ucxx Array to send, its size) for a fetch of ``tensor_id``."""
        try:
            obj = self._lookup(tensor_id)
        except Exception as exc:
            log.exception("lookup of %r failed", tensor_id)
            return _FAILED, _message(f"lookup of tensor {tensor_id!r} failed at the producer: {exc!r}"), None, 0
        if obj is None:
            text = f"unknown tensor id {tensor_id!r}: never published or already freed at the producer"
            return _UNKNOWN, _message(text), None, 0
        try:
            buffer, served = _readable_buffer(obj)
            if buffer is not None and buffer.cuda and not self._context.cuda_support:
                raise ValueError("it is a device array and this UCX has no CUDA support here")
        except Exception as exc:
            return _FAILED, _message(f"tensor {tensor_id!r} cannot be served: {exc}"), None, 0
        if served != nbytes:
            text = f"size mismatch for tensor {tensor_id!r}: the producer has {served} bytes, the consumer expects {nbytes}"
            return _SIZE_MISMATCH, _message(text), None, served
        return _OK, b"", buffer, served

    # ----------------------------------------------------------------- peers

    def _running(self) -> _Progress:
        if self._progress is None:
            raise DataPlaneError(f"the UCX transport is {'stopped' if self._stopped else 'not started'}")
        if asyncio.get_running_loop() is not self._loop:
            raise DataPlaneError("the UCX transport was started in another event loop")
        return self._progress

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = _Peer(self, address)
            if peer.error is not None:
                raise peer.error
            self._peers[address] = peer
        return peer

    def _drop_peer(self, peer: _Peer, error: DataPlaneError) -> None:
        """Forget a peer: fail what is in flight with it and close its endpoint."""
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
        peer.close(error)

    def _control(self, op: int, reply_tag: int, nbytes: int, timeout_s: float, payload: bytes) -> bytes:
        me = self._address_bytes
        timeout_ms = int(max(0.0, min(timeout_s * 1000, 0xFFFFFFFF)))
        return _CTRL.pack(_MAGIC, _VERSION, op, len(me), len(payload), timeout_ms, reply_tag, nbytes) + me + payload


class _Fetch:
    """One fetch in flight: settles its future from the callbacks of its requests.

    The producer answers a fetch with the payload alone when it can serve it, and with a status
    message alone otherwise (an error, or OK for an empty tensor); whichever arrives first
    cancels the receive posted for the other.
    """

    __slots__ = ("transport", "peer", "tensor_id", "nbytes", "future", "status", "ctrl_req",
                 "status_req", "data_req", "timer")  # fmt: skip

    def __init__(self, transport: UcxTransport, peer: _Peer, tensor_id: str, nbytes: int, future: asyncio.Future[None]):
        self.transport = transport
        self.peer = peer
        self.tensor_id = tensor_id
        self.nbytes = nbytes
        self.future = future
        self.status = np.empty(_STATUS_MAX, np.uint8)
        self.ctrl_req: Any = None
        self.status_req: Any = None
        self.data_req: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def requests(self) -> list[Any]:
        return [r for r in (self.ctrl_req, self.status_req, self.data_req) if r is not None]

    def _what(self) -> str:
        return f"{self.tensor_id!r} from {_describe(self.peer.address)}"

    def on_ctrl(self, exc: BaseException | None) -> None:
        self.ctrl_req = None
        if exc is not None:
            self.fail(DataPlaneError(f"sending the request for {self._what()} failed: {exc}"), broken=True)
        self._settled()

    def on_status(self, exc: BaseException | None) -> None:
        self.status_req = None
        if exc is not None:
            self.fail(DataPlaneError(f"fetch of {self._what()} failed: {exc}"), broken=True)
        else:
            try:
                code, _, message = _parse_status(self.status)
            except DataPlaneError as error:
                code, message = _FAILED, str(error)
            self.data_req = self._cancel(self.data_req)  # no payload follows a status
            if code == _OK:
                self._done()
            else:
                self.fail(DataPlaneError(message or f"the producer refused {self.tensor_id!r} (status {code})"))
        self._settled()

    def on_data(self, exc: BaseException | None) -> None:
        self.data_req = None
        if exc is not None:
            self.fail(DataPlaneError(f"fetch of {self._what()} failed: {exc}"), broken=True)
        else:
            self.status_req = self._cancel(self.status_req)  # no status follows a payload
            self._done()
        self._settled()

    def _cancel(self, req: Any) -> None:
        if req is not None and self.transport._progress is not None:
            self.transport._progress.discard(req)  # never matched: dropping it cancels it

    def _done(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
            stats = self.transport._stats
            stats["fetches"] += 1
            stats["bytes_fetched"] += self.nbytes

    def _settled(self) -> None:
        if self.ctrl_req is None and self.status_req is None and self.data_req is None:
            if self.timer is not None:
                self.timer.cancel()
            self.peer.ops.discard(self)

    def expire(self, timeout_s: float) -> None:
        # A live peer on this host is only slow: keep its endpoint (closing it could wait on
        # the peer forever). Our receives stay posted until it answers or exits (see ``fail``).
        self.fail(
            DataPlaneError(f"fetch of {self._what()} timed out after {timeout_s:g} s"),
            broken=not self.peer.local,
        )  # fmt: skip

    def fail(self, error: DataPlaneError, broken: bool = False) -> None:
        """Fail the fetch; ``broken``: the endpoint is suspect, drop it.

        Requests still posted are no longer polled for, but stay watched, with ``out`` kept
        alive, until UCX is done with them (their callbacks then only tidy up).
        """
        if not self.future.done():
            self.future.set_exception(error)
        if self.timer is not None:
            self.timer.cancel()
        progress = self.transport._progress
        if progress is not None:
            for req in self.requests():
                progress.demote(req)
        if broken:
            self.transport._drop_peer(self.peer, error)


class _Send:
    """A payload the producer is sending: counted when done, abandoned when stuck."""

    __slots__ = ("transport", "peer", "tensor_id", "nbytes", "req", "timer")

    def __init__(self, transport: UcxTransport, peer: _Peer, tensor_id: str, nbytes: int):
        self.transport = transport
        self.peer = peer
        self.tensor_id = tensor_id
        self.nbytes = nbytes
        self.req: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def requests(self) -> list[Any]:
        return [self.req] if self.req is not None else []

    def on_sent(self, exc: BaseException | None) -> None:
        self.req = None
        if self.timer is not None:
            self.timer.cancel()
        self.peer.ops.discard(self)
        if exc is None:
            stats = self.transport._stats
            stats["fetches_served"] += 1
            stats["bytes_served"] += self.nbytes
        else:
            log.debug("sending %r to %s failed: %s", self.tensor_id, _describe(self.peer.address), exc)

    def expire(self) -> None:
        # The consumer gave up long ago. Stop polling for the send; a tcp peer's endpoint is
        # dropped (which cancels it), a local one stays until the consumer reads or exits.
        error = DataPlaneError(f"{_describe(self.peer.address)} did not take {self.tensor_id!r} in time")
        self.fail(error, broken=not self.peer.local)

    def fail(self, error: DataPlaneError, broken: bool = False) -> None:
        progress = self.transport._progress
        if progress is not None and self.req is not None:
            progress.demote(self.req)
        if broken:
            self.transport._drop_peer(self.peer, error)


class _Peer:
    """Another transport: its cached endpoint, what is in flight with it, and its liveness."""

    def __init__(self, transport: UcxTransport, address: str):
        self.transport = transport
        self.address = address
        self.ops: set[_Fetch | _Send] = set()
        self.error: DataPlaneError | None = None
        self._ep: Any = None
        self._pidfd: int | None = None
        parts = address.split(":")
        if len(parts) != 6 or parts[0] != _ADDRESS_PREFIX:
            raise DataPlaneError(f"not a UCX data-plane address: {address[:80]!r}")
        boot_id, pid_ns, pid, start, worker_address = parts[1:]
        try:
            self.worker_address = base64.urlsafe_b64decode(worker_address)
            self.pid = int(pid)
        except ValueError as exc:
            raise DataPlaneError(f"not a UCX data-plane address: {address[:80]!r}") from exc
        # Same boot and pid namespace: we can watch the process, and can do without UCX error
        # handling (which would rule out shared memory).
        self.local = (boot_id, pid_ns) == transport._local_identity
        if self.local:
            self._watch(start)

    def _watch(self, start: str) -> None:
        gone = DataPlaneError(f"peer process {self.pid} is gone")
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.error = gone
            return
        except (OSError, AttributeError):  # no pidfd on this system: deadlines only
            return
        if start != "0" and _start_time(self.pid) != start:  # exited (or a reused pid)
            os.close(self._pidfd)
            self._pidfd = None
            self.error = gone
            return
        loop = self.transport._loop
        assert loop is not None
        loop.add_reader(self._pidfd, self._exited)  # readable once the process has exited

    def _exited(self) -> None:
        self.transport._drop_peer(self, DataPlaneError(f"peer process {self.pid} exited"))

    def endpoint(self) -> Any:
        if self.error is not None:
            raise self.error
        if self._ep is None:
            try:
                self._ep = _ucx.UCXEndpoint.create_from_worker_address(
                    self.transport._worker,
                    _ucx.UCXAddress.create_from_buffer(self.worker_address),
                    not self.local,  # endpoint error handling
                )
            except Exception as exc:
                raise DataPlaneError(f"cannot connect to {_describe(self.address)}: {exc}") from exc
        return self._ep

    def close(self, error: DataPlaneError) -> None:
        """Fail what is in flight with this peer and close the endpoint, without blocking."""
        if self.error is None:
            self.error = error
        ops, self.ops = list(self.ops), set()
        for op in ops:
            op.fail(self.error)
        if self._pidfd is not None:
            loop = self.transport._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        ep, self._ep = self._ep, None
        progress = self.transport._progress
        if ep is None:
            return
        if not self.local:
            # With UCX error handling ucxx closes by force: it cancels what is still in flight
            # and needs nothing from the peer.
            try:
                ep.close_blocking(period=100_000_000, max_attempts=1)
            except Exception as exc:
                log.debug("closing the endpoint to %s: %s", _describe(self.address), exc)
            if progress is not None:
                progress.kick()  # collect the cancelled requests
            return
        # Without error handling a close flushes, which can wait on the peer forever (a frozen
        # one), so it must not block. Nor does it cancel the receives still posted: those are
        # dropped (which cancels them) after a grace period, in which whatever the peer wrote
        # into shared memory before it went away is drained and nothing can touch their
        # buffers any more. (Dropping the last reference to an endpoint that was never closed
        # would block the same way: ucxx's destructor closes it synchronously.)
        try:
            close_req = ep.close()
        except Exception as exc:
            log.debug("closing the endpoint to %s: %s", _describe(self.address), exc)
            close_req = None
        if progress is not None:
            if close_req is not None:
                progress.watch(close_req, _log_failure, keep=ep, active=False)
            else:
                progress.keep(ep)
            progress.discard_later([req for op in ops for req in op.requests()], _ORPHAN_GRACE_S)


class _Progress:
    """Drives a UCX worker from the event loop, without a thread.

    ``watch(req, callback)`` calls ``callback(error or None)`` once ``req`` completes, from
    within the progress pass that completed it. Watching an *active* request, and any event,
    starts polling the worker between the loop's other tasks; after ``_LINGER_S`` without a
    completion it is armed and the loop sleeps on its epoll descriptor (with a safety tick
    while requests are pending).
    """

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop):
        self._worker = worker
        self._loop = loop
        # id(request) -> [request, callback, active, object kept alive while UCX may use it]
        self._pending: dict[int, list[Any]] = {}
        self._active = 0
        self._timers: set[asyncio.TimerHandle] = set()
        self._spinner: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._closed = False
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._on_event)
        worker.arm()

    def watch(self, req: Any, callback: Callback, *, keep: Any, active: bool = True) -> None:
        if req.completed:
            callback(_error_of(req))
            return
        self._pending[id(req)] = [req, callback, active, keep]
        if active:
            self._active += 1
            self.kick()
        elif self._tick is None:
            self._tick = self._loop.call_later(_SAFETY_TICK_S, self._on_tick)

    def demote(self, req: Any) -> None:
        """Keep watching ``req`` (and its buffer), but stop polling the worker for it."""
        entry = self._pending.get(id(req))
        if entry is not None and entry[0] is req and entry[2]:
            entry[2] = False
            self._active -= 1

    def discard(self, req: Any) -> None:
        """Stop watching ``req`` without a callback; dropping it cancels it in UCX."""
        entry = self._pending.get(id(req))
        if entry is not None and entry[0] is req:
            del self._pending[id(req)]
            self._active -= entry[2]

    def discard_later(self, reqs: list[Any], delay_s: float) -> None:
        if not reqs or self._closed:
            return

        def discard() -> None:
            self._timers.discard(timer)
            for req in reqs:
                self.discard(req)

        timer = self._loop.call_later(delay_s, discard)
        self._timers.add(timer)

    def keep(self, obj: Any) -> None:
        """Never drop ``obj``: an endpoint whose close failed (ucxx's destructor would close it
        synchronously, which can wait on its peer forever)."""
        _NEVER_DROPPED.append(obj)

    def kick(self) -> None:
        """Poll the worker from the next loop iteration on (until idle and lingered)."""
        if not self._closed and (self._spinner is None or self._spinner.done()):
            self._spinner = self._loop.create_task(self._poll())

    def close(self) -> None:
        self._closed = True
        if self._spinner is not None:
            self._spinner.cancel()
        if self._tick is not None:
            self._tick.cancel()
        for timer in self._timers:
            timer.cancel()
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        pending, self._pending = self._pending, {}
        self._active = 0
        stopped = DataPlaneError("the UCX transport was stopped")
        for _, callback, _, _ in pending.values():
            _call(callback, stopped)

    def _advance(self) -> bool:
        """Progress the worker (for at most ``_PROGRESS_BUDGET_S``) and run the callbacks of
        what completed; True if any ran.

        (Polling on inside this call while a transfer is pending, instead of yielding to the
        loop in between, was measured: no faster, and slower for small messages.)
        """
        worker = self._worker
        end = time.perf_counter() + _PROGRESS_BUDGET_S
        while worker.progress_once():
            if time.perf_counter() >= end:
                break
        else:
            worker.progress()  # idle now; this also runs ucxx's cancellations of failed endpoints
        return self._collect()

    def _collect(self) -> bool:
        """Run the callbacks of the requests that completed; True if any ran."""
        pending = self._pending
        done = [key for key, entry in pending.items() if entry[0].completed]
        if not done:
            return False
        entries = [pending.pop(key) for key in done]  # callbacks may watch and discard others
        for req, callback, active, _ in entries:
            self._active -= active
            _call(callback, _error_of(req))
        return True

    def _on_event(self) -> None:
        if self._closed:
            return
        self._advance()
        self.kick()  # linger: the next message of an exchange is usually right behind

    def _on_tick(self) -> None:
        self._tick = None
        if self._closed:
            return
        self._advance()
        if self._pending:
            self._tick = self._loop.call_later(_SAFETY_TICK_S, self._on_tick)
        if self._active:
            self.kick()

    async def _poll(self) -> None:
        last = time.perf_counter()
        while not self._closed:
            if self._advance():
                last = time.perf_counter()
            if time.perf_counter() - last >= _LINGER_S and self._worker.arm():
                # Armed: the epoll descriptor reports the next event to the loop.
                if self._pending and self._tick is None:
                    self._tick = self._loop.call_later(_SAFETY_TICK_S, self._on_tick)
                return
            await asyncio.sleep(0)


# ----------------------------------------------------------------- helpers


def _error_of(req: Any) -> BaseException | None:
    try:
        req.check_error()
    except Exception as exc:
        return exc
    return None


def _call(callback: Callback, exc: BaseException | None) -> None:
    try:
        callback(exc)
    except Exception:
        log.exception("data-plane completion callback failed")


def _log_failure(exc: BaseException | None) -> None:
    if exc is not None:
        log.debug("data-plane message failed: %s", exc)


def _writable_buffer(out: Any) -> tuple[Any, int]:
    """(ucxx Array over ``out`` or None when empty, nbytes); ``out`` must be writable, C-contiguous."""
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise DataPlaneError("fetch needs a writable output array")
        if not out.flags.c_contiguous:
            raise DataPlaneError("fetch needs a C-contiguous output array")
        return (_Array(out) if out.nbytes else None), out.nbytes
    if hasattr(out, "__cuda_array_interface__"):  # CuPy and friends: ucxx takes them as they are
        if out.__cuda_array_interface__.get("data", (0, False))[1]:
            raise DataPlaneError("fetch needs a writable output array")
        array = _Array(out)
        if not array.c_contiguous:
            raise DataPlaneError("fetch needs a C-contiguous output array")
        return (array if array.nbytes else None), array.nbytes
    try:
        view = memoryview(out)
    except TypeError as exc:
        raise DataPlaneError(f"fetch needs a NumPy or CuPy array to fill, not {type(out).__name__}") from exc
    if view.readonly:
        raise DataPlaneError("fetch needs a writable output array")
    if not view.c_contiguous:
        raise DataPlaneError("fetch needs a C-contiguous output array")
    if view.nbytes == 0:
        return None, 0
    return _Array(np.frombuffer(view, np.uint8)), view.nbytes


def _readable_buffer(obj: Any) -> tuple[Any, int]:
    """(ucxx Array over ``obj`` or None when empty, nbytes) for a buffer ``lookup`` returned."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError("array is not C-contiguous")
        return (_Array(obj) if obj.nbytes else None), obj.nbytes
    if hasattr(obj, "__cuda_array_interface__"):
        array = _Array(obj)
        if not array.c_contiguous:
            raise ValueError("device array is not C-contiguous")
        return (array if array.nbytes else None), array.nbytes
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    if view.nbytes == 0:
        return None, 0
    return _Array(np.frombuffer(view, np.uint8)), view.nbytes


def _parse_status(status: np.ndarray) -> tuple[int, int, str]:
    magic, version, code, msg_len, served = _STATUS.unpack_from(status)
    if magic != _MAGIC or version != _VERSION:
        raise DataPlaneError(f"the peer answered in an unknown format ({magic!r} v{version})")
    message = status[_STATUS.size : _STATUS.size + msg_len].tobytes().decode("utf-8", "replace")
    return code, served, message


def _message(text: str) -> bytes:
    return text.encode("utf-8")[: _STATUS_MAX - _STATUS.size]


def _chunks(ids: list[str], limit: int) -> list[list[str]]:
    """Split ``ids`` into lists whose JSON encodings stay under ``limit`` bytes."""
    chunks: list[list[str]] = [[]]
    size = 2
    for tensor_id in ids:
        item = len(json.dumps(tensor_id).encode("utf-8")) + 2
        if item + 2 > limit:
            raise DataPlaneError(f"tensor id is too long: {tensor_id[:64]!r}...")
        if size + item > limit and chunks[-1]:
            chunks.append([])
            size = 2
        chunks[-1].append(tensor_id)
        size += item
    return chunks


def _describe(address: str) -> str:
    """A short human form of an address, for messages."""
    parts = address.split(":")
    if len(parts) == 6:
        return f"peer pid {parts[3]} on host {parts[1][:8]}"
    return repr(address[:40])


def _host_identity() -> tuple[str, str]:
    """(boot id, pid namespace): equal for two processes that see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = socket.gethostname().replace(":", "_") or "unknown"
    try:
        pid_ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").rstrip("]")
    except OSError:
        pid_ns = "0"
    return boot_id, pid_ns


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None
    when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _net_device_for(host: str) -> str | None:
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
