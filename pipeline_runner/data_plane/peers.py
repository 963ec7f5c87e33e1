"""Other transports: their addresses, one cached endpoint each, and whether they are alive.

An address is the UCX worker address plus the identity of the owning process (boot id, pid
namespace, pid, start time). Endpoints are created from worker addresses, cached per peer and
used in both directions: between processes of one host UCX then moves data through shared
memory (sysv), across hosts over tcp. (A listener and ``create_endpoint`` would always go over
tcp, and so does any endpoint with UCX error handling, which makes every shared-memory
transport unreachable; what each costs: benchmarks/RESULTS.md, "Data plane: measurements
formerly in ucx_transport.py comments".)

Peer death: endpoints between processes of one host cannot have UCX error handling, so a peer
on this host is watched through a pidfd: when it exits, what is in flight with it fails at once
and its endpoint is dropped. Peers on other hosts (or in another pid namespace) get endpoints
with UCX error handling, over tcp. Every fetch also has its own deadline; a live peer on this
host that misses it keeps its endpoint. A remote peer's endpoint that failed or missed a
deadline is retired: let go of, not closed, until the transport stops (UCX pairs the two
workers' endpoints on one tcp connection, so closing ours would reset the peer's new one).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .errors import DataPlaneError
from .progress import Progress, log_failure
from .ucx_lib import UcxLib

log = logging.getLogger(__name__)

_ADDRESS_PREFIX = "ucx1"
# Receives still posted to a peer that exited are dropped (cancelled) this long after.
ORPHAN_GRACE_S = 2.0


class HostIdentity(NamedTuple):
    """Equal for two processes that see each other's pids (and can share memory)."""

    boot_id: str
    pid_ns: str


def host_identity() -> HostIdentity:
    """This process's boot id and pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = socket.gethostname().replace(":", "_") or "unknown"
    try:
        pid_ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").rstrip("]")
    except OSError:
        pid_ns = "0"
    return HostIdentity(boot_id, pid_ns)


def start_time(pid: int) -> str | None:
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


@dataclass(frozen=True)
class PeerAddress:
    """A transport's address, as peers pass it around: ``ucx1:boot:pidns:pid:start:worker``."""

    identity: HostIdentity
    pid: int
    start: str  # start_time(pid), "0" when unknown
    worker_address: bytes

    @classmethod
    def of_this_process(cls, identity: HostIdentity, worker_address: bytes) -> PeerAddress:
        pid = os.getpid()
        return cls(identity, pid, start_time(pid) or "0", worker_address)

    @classmethod
    def parse(cls, address: str) -> PeerAddress:
        parts = address.split(":")
        if len(parts) != 6 or parts[0] != _ADDRESS_PREFIX:
            raise DataPlaneError(f"not a UCX data-plane address: {address[:80]!r}")
        boot_id, pid_ns, pid, start, worker_address = parts[1:]
        try:
            return cls(HostIdentity(boot_id, pid_ns), int(pid), start, base64.urlsafe_b64decode(worker_address))
        except ValueError as exc:
            raise DataPlaneError(f"not a UCX data-plane address: {address[:80]!r}") from exc

    def __str__(self) -> str:
        worker_address = base64.urlsafe_b64encode(self.worker_address).decode("ascii")
        return ":".join([_ADDRESS_PREFIX, *self.identity, str(self.pid), self.start, worker_address])


def describe(address: str) -> str:
    """A short human form of an address, for messages."""
    parts = address.split(":")
    if len(parts) == 6:
        return f"peer pid {parts[3]} on host {parts[1][:8]}"
    return repr(address[:40])


class InFlight(Protocol):
    """A transfer with a peer that must end when the peer goes."""

    def requests(self) -> list[Any]:
        """The UCX requests still posted for it."""
        ...

    def fail(self, error: DataPlaneError, broken: bool = False) -> None: ...


@dataclass(frozen=True)
class PeerInfo:
    """What a transport knows about one of its peers."""

    address: str
    pid: int
    local: bool  # on this host: shared memory, no UCX error handling, its pid watched


class Peer:
    """Another transport: its cached endpoint, what is in flight with it, and its liveness."""

    def __init__(self, address: str, parsed: PeerAddress, local: bool, links: _Links, forget: Callable[[Peer], None]):
        self.address = address
        self.pid = parsed.pid
        # Same boot and pid namespace: we can watch the process, and can do without UCX error
        # handling (which would rule out shared memory).
        self.local = local
        self.error: DataPlaneError | None = None
        self._worker_address = parsed.worker_address
        self._links = links
        self._forget = forget
        self._in_flight: set[InFlight] = set()
        self._ep: Any = None
        self._pidfd: int | None = None
        if local:
            self._watch(parsed.start)

    @property
    def info(self) -> PeerInfo:
        return PeerInfo(self.address, self.pid, self.local)

    def track(self, op: InFlight) -> None:
        """Fail ``op`` when this peer goes."""
        self._in_flight.add(op)

    def untrack(self, op: InFlight) -> None:
        self._in_flight.discard(op)

    def endpoint(self) -> Any:
        """The endpoint to this peer, created on first use; DataPlaneError when it is gone."""
        if self.error is not None:
            raise self.error
        if self._ep is None:
            api = self._links.lib.api
            try:
                self._ep = api.UCXEndpoint.create_from_worker_address(
                    self._links.worker,
                    api.UCXAddress.create_from_buffer(self._worker_address),
                    not self.local,  # endpoint error handling
                )
            except Exception as exc:
                raise DataPlaneError(f"cannot connect to {describe(self.address)}: {exc}") from exc
        return self._ep

    def drop(self, error: DataPlaneError, *, closing: bool = False) -> None:
        """Forget this peer: fail what is in flight with it and let go of its endpoint.

        ``closing``: this transport is stopping, so a remote peer's endpoint is closed too.
        """
        self._forget(self)
        self._close(error, closing)

    def send_failed(self, exc: BaseException) -> None:
        """A message to this peer failed: a remote peer's endpoint is then broken for good
        (reset by the peer, e.g. once it gave up on a fetch across a cut link), so the next
        answer opens a new one."""
        if not self.local:
            self._links.loop.call_soon(self.drop, DataPlaneError(f"sending to {describe(self.address)} failed: {exc}"))

    def _watch(self, start: str) -> None:
        gone = DataPlaneError(f"peer process {self.pid} is gone")
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.error = gone
            return
        except (OSError, AttributeError):  # no pidfd on this system: deadlines only
            return
        if start != "0" and start_time(self.pid) != start:  # exited (or a reused pid)
            os.close(self._pidfd)
            self._pidfd = None
            self.error = gone
            return
        self._links.loop.add_reader(self._pidfd, self._exited)  # readable once the process has exited

    def _exited(self) -> None:
        self.drop(DataPlaneError(f"peer process {self.pid} exited"))

    def _close(self, error: DataPlaneError, closing: bool = False) -> None:
        """Fail what is in flight with this peer and let go of the endpoint, without blocking."""
        if self.error is None:
            self.error = error
        ops, self._in_flight = list(self._in_flight), set()
        for op in ops:
            op.fail(self.error)
        loop = self._links.loop
        if self._pidfd is not None:
            if not loop.is_closed():
                loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        ep, self._ep = self._ep, None
        progress = self._links.progress
        if ep is None:
            return
        if not self.local and closing:
            _close_by_force(ep)
            progress.kick()  # collect the cancelled requests
            return
        if not self.local:
            # Not closed while we keep serving: UCX's tcp endpoints between two workers share
            # one connection, and closing ours would reset the peer's (the new one of its next
            # fetch, after a cut link), whose failure would reset ours in turn. Only retired
            # (closed when the transport stops: never dropped unclosed, whose destructor would
            # close it synchronously). Receives still posted stay watched, their buffers alive:
            # over tcp a late answer can land whenever the link comes back (dropping them
            # after a grace period corrupted the heap); they end with that answer, when UCX
            # fails the endpoint, or when the transport stops.
            self._links.retired.append(ep)
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
            log.debug("closing the endpoint to %s: %s", describe(self.address), exc)
            close_req = None
        if not progress.closed:
            if close_req is not None:
                progress.watch(close_req, log_failure, keep=ep, active=False)
            else:
                progress.keep(ep)
            progress.discard_later([req for op in ops for req in op.requests()], ORPHAN_GRACE_S)


@dataclass(frozen=True)
class _Links:
    """What every peer's endpoint hangs off: ucxx, the local worker, its loop and progress."""

    lib: UcxLib
    worker: Any
    loop: asyncio.AbstractEventLoop
    progress: Progress
    # Endpoints to remote peers let go of but not closed while serving (see ``Peer._close``).
    retired: list[Any]


def _close_by_force(ep: Any) -> None:
    """Close an endpoint with UCX error handling: ucxx cancels what is in flight and needs
    nothing from the peer."""
    try:
        ep.close_blocking(period=100_000_000, max_attempts=1)
    except Exception as exc:
        log.debug("closing a data-plane endpoint: %s", exc)


class Peers:
    """The peers of one transport, by address: created on first contact, dropped when they fail."""

    def __init__(
        self, lib: UcxLib, worker: Any, loop: asyncio.AbstractEventLoop, progress: Progress, identity: HostIdentity
    ):
        self._links = _Links(lib, worker, loop, progress, [])
        self._identity = identity
        self._peers: dict[str, Peer] = {}

    def get(self, address: str) -> Peer:
        """The peer at ``address``; DataPlaneError for a bad address or a process that is gone."""
        peer = self._peers.get(address)
        if peer is None:
            parsed = PeerAddress.parse(address)
            peer = Peer(address, parsed, parsed.identity == self._identity, self._links, self._forget)
            if peer.error is not None:
                raise peer.error
            self._peers[address] = peer
        return peer

    def drop_all(self, error: DataPlaneError) -> None:
        """Let go of every peer as this transport stops."""
        for peer in list(self._peers.values()):
            peer.drop(error, closing=True)
        retired, self._links.retired[:] = list(self._links.retired), []
        for ep in retired:
            _close_by_force(ep)

    def infos(self) -> dict[str, PeerInfo]:
        return {address: peer.info for address, peer in self._peers.items()}

    def _forget(self, peer: Peer) -> None:
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
