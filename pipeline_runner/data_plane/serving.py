"""The producer side of the transport: answers peers' control messages (fetches and releases)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .errors import DataPlaneError
from .exchanges import Send, TransferStats
from .peers import Peer, Peers, describe
from .progress import Progress, error_of, log_failure
from .ucx_arrays import readable_view
from .ucx_lib import UcxLib

log = logging.getLogger(__name__)

# A producer gives up on a send this long after the consumer's own deadline passed.
SERVE_GRACE_S = 2.0


@dataclass(slots=True)
class _Answer:
    """How to answer one fetch: the payload, or a status instead."""

    code: int  # a wire status
    message: str
    buffer: Any  # the ucxx Array to send, None for a status
    served_nbytes: int


class Server:
    """Keeps one receive posted on the control tag and answers what arrives there.

    ``lookup(tensor_id)`` returns the buffer to serve (see ``UcxTransport``), ``on_release``
    receives the ids consumers are done with.
    """

    def __init__(
        self, lib: UcxLib, context: Any, worker: Any, loop: asyncio.AbstractEventLoop, progress: Progress,
        peers: Peers, stats: TransferStats, lookup: Callable[[str], Any | None],
        on_release: Callable[[list[str]], None] | None,
    ):  # fmt: skip
        self._lib = lib
        self._context = context
        self._worker = worker
        self._loop = loop
        self._progress = progress
        self._peers = peers
        self._stats = stats
        self._lookup = lookup
        self._on_release = on_release

    def start(self) -> None:
        self._post_control_recv()

    def _post_control_recv(self) -> None:
        """Keep one receive posted on the control tag; handle messages as they complete."""
        lib, progress = self._lib, self._progress
        while not progress.closed:
            buf = np.empty(wire.CONTROL_MAX_BYTES, np.uint8)
            req = self._worker.tag_recv(lib.array(buf), lib.tag(wire.CONTROL_TAG))
            if not req.completed:
                progress.watch(req, functools.partial(self._on_control, buf), keep=buf, active=False)
                return
            self._handle_control(buf, error_of(req))  # it was already queued: no need to wait

    def _on_control(self, buf: np.ndarray, exc: BaseException | None) -> None:
        self._handle_control(buf, exc)
        self._post_control_recv()

    def _handle_control(self, buf: np.ndarray, exc: BaseException | None) -> None:
        if exc is not None:
            if not self._progress.closed:
                log.warning("dropped a data-plane control message: %s", exc)
            return
        try:
            try:
                msg = wire.decode_control(buf)
            except DataPlaneError as error:
                log.warning("ignoring %s", error)
                return
            if msg.op == wire.FETCH:
                self._serve(msg)
            elif msg.op == wire.RELEASE:
                if self._on_release is not None:
                    self._on_release(msg.released_ids)
            else:
                log.warning("ignoring a data-plane control message with op %d", msg.op)
        except Exception:
            log.exception("failed to handle a data-plane control message")

    def _serve(self, msg: wire.ControlMessage) -> None:
        tensor_id = msg.payload.decode("utf-8")  # a fetch's payload is the id
        try:
            peer = self._peers.get(msg.requester)
            ep = peer.endpoint()
        except DataPlaneError as exc:
            log.debug("not serving %r: %s", tensor_id, exc)
            return
        answer = self._resolve(tensor_id, msg.nbytes)
        lib, progress = self._lib, self._progress
        if answer.code != wire.OK or not answer.served_nbytes:  # a status instead of the payload
            status = wire.encode_status(answer.code, answer.served_nbytes, answer.message)
            try:
                status_req = ep.tag_send(lib.array(status), lib.tag(msg.reply_tag))
            except Exception as exc:
                peer.drop(DataPlaneError(f"cannot answer {describe(msg.requester)}: {exc}"))
                return
            progress.watch(status_req, functools.partial(_status_sent, peer), keep=status, active=False)
            if answer.code == wire.OK:
                self._stats.served(0)  # an empty tensor: the status is all there is to send
            return
        try:
            data_req = ep.tag_send(answer.buffer, lib.tag(wire.data_tag(msg.reply_tag)))
        except Exception as exc:
            peer.drop(DataPlaneError(f"cannot answer {describe(msg.requester)}: {exc}"))
            return
        send = Send(peer, progress, self._stats, tensor_id, answer.served_nbytes)
        send.start(data_req, answer.buffer, self._loop, msg.timeout_ms / 1000 + SERVE_GRACE_S)

    def _resolve(self, tensor_id: str, nbytes: int) -> _Answer:
        """What to answer a fetch of ``nbytes`` of ``tensor_id`` with."""
        try:
            obj = self._lookup(tensor_id)
        except Exception as exc:
            log.exception("lookup of %r failed", tensor_id)
            return _Answer(wire.FAILED, f"lookup of tensor {tensor_id!r} failed at the producer: {exc!r}", None, 0)
        if obj is None:
            text = f"unknown tensor id {tensor_id!r}: never published or already freed at the producer"
            return _Answer(wire.UNKNOWN, text, None, 0)
        try:
            buffer, served = readable_view(obj, self._lib.array)
            if buffer is not None and buffer.cuda and not self._context.cuda_support:
                raise ValueError("it is a device array and this UCX has no CUDA support here")
        except Exception as exc:
            return _Answer(wire.FAILED, f"tensor {tensor_id!r} cannot be served: {exc}", None, 0)
        if served != nbytes:
            text = f"size mismatch for tensor {tensor_id!r}: the producer has {served} bytes, the consumer expects {nbytes}"
            return _Answer(wire.SIZE_MISMATCH, text, None, served)
        return _Answer(wire.OK, "", buffer, served)  # (positional: keywords cost more, per fetch)


def _status_sent(peer: Peer, exc: BaseException | None) -> None:
    if exc is not None:
        log_failure(exc)
        peer.send_failed(exc)

