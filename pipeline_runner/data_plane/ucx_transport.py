"""Point-to-point byte transfer between processes over UCX (ucxx), for the data plane.

``UcxTransport`` moves the bytes of one buffer from the process that holds it (the producer)
into a preallocated buffer of another process (the consumer). It knows nothing about operators,
NATS or dtypes: a producer serves whatever its ``lookup(tensor_id)`` returns, and a consumer asks
``fetch(address, tensor_id, out, timeout_s)``. ucxx is imported by ``start()``, not here.

It composes one UCX context and worker (ucx_lib.py) with:

* progress.py: the worker progressed on the event loop, without a thread;
* peers.py: addresses, one cached endpoint per peer, peer liveness;
* wire.py: the tag protocol and its messages;
* exchanges.py: fetches and sends in flight; serving.py: the producer's answers.

Each design choice was made by measurement (2 cores, no GPU; benchmarks/ucx_raw.py compares
with plain ucxx); the numbers are in benchmarks/RESULTS.md, "Data plane: measurements formerly
in ucx_transport.py comments". In short: ucxx's low-level API rather than its asyncio layer,
endpoints from worker addresses rather than a listener, tag send/receive rather than active
messages (whose receiver allocates, so a copy into ``out`` would follow).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import ucx_lib, wire
from .errors import DataPlaneError
from .exchanges import Fetch, TransferStats
from .peers import HostIdentity, PeerAddress, PeerInfo, Peers, describe, host_identity
from .progress import Progress, log_failure
from .serving import Server
from .ucx_arrays import writable_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Started:
    """What exists between ``start()`` and ``stop()``: dropping it frees the UCX worker."""

    lib: ucx_lib.UcxLib
    context: Any
    loop: asyncio.AbstractEventLoop
    progress: Progress
    peers: Peers
    address_bytes: bytes  # this transport's address, as control messages carry it


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
    whatever it is. ``identity`` tells peers which host this process is on (default: this
    machine's boot id and pid namespace); peers with another one are reached as remote hosts.
    """

    def __init__(
        self,
        lookup: Callable[[str], Any | None],
        *,
        host: str = "127.0.0.1",
        on_release: Callable[[list[str]], None] | None = None,
        identity: HostIdentity | None = None,
    ):
        self._lookup = lookup
        self._host = host
        self._on_release = on_release
        self._identity = identity
        self._started: _Started | None = None
        self._address: str | None = None
        self._next_fetch = 1
        self._stopped = False
        self._stats = TransferStats()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the UCX worker and start answering peers (idempotent)."""
        if self._stopped:
            raise DataPlaneError("a stopped UcxTransport cannot be started again")
        if self._started is not None:
            return
        loop = asyncio.get_running_loop()
        lib = ucx_lib.loaded()
        if lib is None:
            try:
                lib = await asyncio.to_thread(ucx_lib.load)  # the loop (and its NATS client) keeps running
            except ImportError as exc:
                raise DataPlaneError(f"the UCX data plane needs ucxx (pip install ucxx-cu12): {exc}") from exc
        if self._started is not None or self._stopped:  # raced with another start() or stop()
            return
        context, worker = lib.create_worker(self._host)
        try:
            progress = Progress(worker, loop)
        except Exception as exc:
            raise DataPlaneError(f"cannot start UCX: {exc}") from exc
        identity = self._identity or host_identity()
        address = str(PeerAddress.of_this_process(identity, bytes(worker.address)))
        peers = Peers(lib, worker, loop, progress, identity)
        self._address = address
        self._started = _Started(lib, context, loop, progress, peers, address.encode("ascii"))
        Server(lib, context, worker, loop, progress, peers, self._stats, self._lookup, self._on_release).start()

    @property
    def address(self) -> str:
        """Where peers reach this transport: pass it to their ``fetch``/``release``."""
        if self._address is None:
            raise DataPlaneError("the UCX transport is not started")
        return self._address

    @property
    def stats(self) -> dict[str, int]:
        """Counters of completed transfers: bytes_served, fetches_served, bytes_fetched, fetches."""
        return self._stats.as_dict()

    @property
    def peers(self) -> dict[str, PeerInfo]:
        """The peers this transport holds an endpoint to (or is watching), by address."""
        return self._started.peers.infos() if self._started is not None else {}

    async def stop(self) -> None:
        """Fail whatever is in flight, close every endpoint and the worker. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        running, self._started = self._started, None
        if running is not None:
            running.peers.drop_all(DataPlaneError("the UCX transport was stopped"))
            running.progress.close()  # drops the remaining requests, which cancels them in UCX
        # Endpoints were closed above; the worker and the context go with their last reference.

    # ----------------------------------------------------------------- consumer side

    async def fetch(self, address: str, tensor_id: str, out: Any, timeout_s: float) -> None:
        """Fill ``out`` with the bytes the peer at ``address`` serves for ``tensor_id``.

        ``out``: a writable C-contiguous NumPy (or CuPy) array of exactly the tensor's size.
        Raises DataPlaneError when the id is unknown or freed there, the sizes differ, the peer
        is gone or unreachable, or ``timeout_s`` passes. After a timeout (or a cancelled call)
        a late answer may still land in ``out``, which the transport keeps alive until then:
        do not reuse it.
        """
        running = self._running()
        lib, loop = running.lib, running.loop
        target, nbytes = writable_view(out, lib.array)
        if target is not None and target.cuda and not running.context.cuda_support:
            raise DataPlaneError("cannot fetch into a device array: this UCX has no CUDA support here")
        id_bytes = tensor_id.encode("utf-8")
        if len(id_bytes) > wire.MAX_ID_BYTES:
            raise DataPlaneError(f"tensor id is too long ({len(id_bytes)} bytes): {tensor_id[:64]!r}...")
        peer = running.peers.get(address)
        ep = peer.endpoint()
        reply = wire.reply_tag(self._next_fetch)
        self._next_fetch += 1
        op = Fetch(peer, running.progress, self._stats, tensor_id, nbytes, loop.create_future())
        request = wire.encode_control(wire.FETCH, running.address_bytes, reply, nbytes, timeout_s, id_bytes)
        try:
            op.post(ep, lib, request, reply, target)
        except Exception as exc:
            error = DataPlaneError(f"cannot reach {describe(address)}: {exc}")
            peer.drop(error)
            raise error from exc
        op.watch(loop, timeout_s, out, request)
        # A cancelled caller leaves ``op`` to finish (or expire) through its callbacks; ``out``
        # stays referenced for as long as UCX may write into it.
        await op.future

    async def release(self, address: str, tensor_ids: list[str]) -> None:
        """Tell the producer at ``address`` these ids are no longer needed (fire and forget).

        Delivery is not confirmed; a peer that is gone is ignored. The producer's
        ``on_release`` callback receives the ids.
        """
        running = self._running()
        if not tensor_ids:
            return
        try:
            ep = running.peers.get(address).endpoint()
        except DataPlaneError as exc:
            log.debug("not releasing %d tensors: %s", len(tensor_ids), exc)
            return
        lib = running.lib
        for payload in wire.release_payloads(tensor_ids, running.address_bytes):
            request = wire.encode_control(wire.RELEASE, running.address_bytes, 0, 0, 0.0, payload)
            try:
                req = ep.tag_send(lib.array(request), lib.tag(wire.CONTROL_TAG))
            except Exception as exc:
                log.debug("release to %s failed: %s", describe(address), exc)
                return
            running.progress.watch(req, log_failure, keep=request, active=False)

    def _running(self) -> _Started:
        running = self._started
        if running is None:
            raise DataPlaneError(f"the UCX transport is {'stopped' if self._stopped else 'not started'}")
        if asyncio.get_running_loop() is not running.loop:
            raise DataPlaneError("the UCX transport was started in another event loop")
        return running
