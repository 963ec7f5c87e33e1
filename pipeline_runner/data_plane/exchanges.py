"""Transfers in flight: a consumer's fetch and a producer's send, settled by UCX callbacks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .errors import DataPlaneError
from .peers import Peer, describe
from .progress import Progress
from .ucx_lib import UcxLib

log = logging.getLogger(__name__)


@dataclass
class TransferStats:
    """Counters of completed transfers."""

    bytes_served: int = 0
    fetches_served: int = 0
    bytes_fetched: int = 0
    fetches: int = 0

    def fetched(self, nbytes: int) -> None:
        self.fetches += 1
        self.bytes_fetched += nbytes

    def served(self, nbytes: int) -> None:
        self.fetches_served += 1
        self.bytes_served += nbytes

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_served": self.bytes_served, "fetches_served": self.fetches_served,
            "bytes_fetched": self.bytes_fetched, "fetches": self.fetches,
        }  # fmt: skip


class Fetch:
    """One fetch in flight: settles its future from the callbacks of its requests.

    The producer answers a fetch with the payload alone when it can serve it, and with a status
    message alone otherwise (an error, or OK for an empty tensor); whichever arrives first
    cancels the receive posted for the other.
    """

    __slots__ = ("peer", "progress", "stats", "tensor_id", "nbytes", "future", "status", "ctrl_req",
                 "status_req", "data_req", "timer")  # fmt: skip

    def __init__(
        self, peer: Peer, progress: Progress, stats: TransferStats, tensor_id: str, nbytes: int,
        future: asyncio.Future[None],
    ):  # fmt: skip
        self.peer = peer
        self.progress = progress
        self.stats = stats
        self.tensor_id = tensor_id
        self.nbytes = nbytes
        self.future = future
        self.status = np.empty(wire.STATUS_MAX_BYTES, np.uint8)
        self.ctrl_req: Any = None
        self.status_req: Any = None
        self.data_req: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def post(self, ep: Any, lib: UcxLib, request: bytes, reply: int, target: Any) -> None:
        """Send ``request`` and post the receives of both possible answers (raises on failure).

        The request goes out first: the answer cannot come back before the two receives are
        posted, and if it did, UCX would keep it (unexpected) until they are.
        """
        self.ctrl_req = ep.tag_send(lib.array(request), lib.tag(wire.CONTROL_TAG))
        self.status_req = ep.tag_recv(lib.array(self.status), lib.tag(reply))
        self.data_req = ep.tag_recv(target, lib.tag(wire.data_tag(reply))) if self.nbytes else None

    def watch(self, loop: asyncio.AbstractEventLoop, timeout_s: float, out: Any, request: bytes) -> None:
        """Start the deadline and the callbacks; ``out`` and ``request`` stay alive meanwhile."""
        self.peer.track(self)
        self.timer = loop.call_at(loop.time() + timeout_s, self.expire, timeout_s)
        if self.data_req is not None:
            self.progress.watch(self.data_req, self.on_data, keep=out)
        if self.status_req is not None:  # (None if the payload already completed and cancelled it)
            self.progress.watch(self.status_req, self.on_status, keep=self.status)
        self.progress.watch(self.ctrl_req, self.on_ctrl, keep=request)

    def requests(self) -> list[Any]:
        return [r for r in (self.ctrl_req, self.status_req, self.data_req) if r is not None]

    def _what(self) -> str:
        return f"{self.tensor_id!r} from {describe(self.peer.address)}"

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
                status = wire.decode_status(self.status)
                code, message = status.code, status.message
            except DataPlaneError as error:
                code, message = wire.FAILED, str(error)
            self._cancel(self.data_req)  # no payload follows a status
            self.data_req = None
            if code == wire.OK:
                self._done()
            else:
                self.fail(DataPlaneError(message or f"the producer refused {self.tensor_id!r} (status {code})"))
        self._settled()

    def on_data(self, exc: BaseException | None) -> None:
        self.data_req = None
        if exc is not None:
            self.fail(DataPlaneError(f"fetch of {self._what()} failed: {exc}"), broken=True)
        else:
            self._cancel(self.status_req)  # no status follows a payload
            self.status_req = None
            self._done()
        self._settled()

    def _cancel(self, req: Any) -> None:
        if req is not None:
            self.progress.discard(req)  # never matched: dropping it cancels it

    def _done(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
            self.stats.fetched(self.nbytes)

    def _settled(self) -> None:
        if self.ctrl_req is None and self.status_req is None and self.data_req is None:
            if self.timer is not None:
                self.timer.cancel()
            self.peer.untrack(self)

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
        for req in self.requests():
            self.progress.demote(req)
        if broken:
            self.peer.drop(error)


class Send:
    """A payload the producer is sending: counted when done, abandoned when stuck."""

    __slots__ = ("peer", "progress", "stats", "tensor_id", "nbytes", "req", "timer")

    def __init__(self, peer: Peer, progress: Progress, stats: TransferStats, tensor_id: str, nbytes: int):
        self.peer = peer
        self.progress = progress
        self.stats = stats
        self.tensor_id = tensor_id
        self.nbytes = nbytes
        self.req: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self, req: Any, buffer: Any, loop: asyncio.AbstractEventLoop, give_up_after_s: float) -> None:
        """Watch the send ``req`` of ``buffer`` until it completes or ``give_up_after_s`` passes."""
        self.req = req
        self.timer = loop.call_later(give_up_after_s, self.expire)
        self.peer.track(self)
        # Active: the producer copies the payload in (sysv fragments, tcp), so it polls until done.
        self.progress.watch(req, self.on_sent, keep=buffer)

    def requests(self) -> list[Any]:
        return [self.req] if self.req is not None else []

    def on_sent(self, exc: BaseException | None) -> None:
        self.req = None
        if self.timer is not None:
            self.timer.cancel()
        self.peer.untrack(self)
        if exc is None:
            self.stats.served(self.nbytes)
        else:
            log.debug("sending %r to %s failed: %s", self.tensor_id, describe(self.peer.address), exc)
            self.peer.send_failed(exc)

    def expire(self) -> None:
        # The consumer gave up long ago. Stop polling for the send; a tcp peer's endpoint is
        # dropped (which cancels it), a local one stays until the consumer reads or exits.
        error = DataPlaneError(f"{describe(self.peer.address)} did not take {self.tensor_id!r} in time")
        self.fail(error, broken=not self.peer.local)

    def fail(self, error: DataPlaneError, broken: bool = False) -> None:
        if self.req is not None:
            self.progress.demote(self.req)
        if broken:
            self.peer.drop(error)
