"""What data-plane transports say to each other over UCX: tags, control and status messages.

Tag protocol: the consumer sends a control message (its address, the tensor id, the size it
expects, a reply tag ``2k``) to the producer's control tag and posts two receives on its
endpoint to the producer: the payload straight into its buffer (tag ``2k+1``) and a status
(tag ``2k``). The producer answers with the payload when it can serve it, else with a status
(unknown id, size mismatch; or OK for an empty tensor); whichever arrives cancels the other.
A release is a control message whose payload is a JSON list of ids, with no reply.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from .errors import DataPlaneError

MAGIC = b"PRDP"
VERSION = 1

# Control messages go to this tag on the producer's worker; reply tags have the top bit clear.
CONTROL_TAG = 0xD47A_C7A1_0000_0001
# magic, version, op, len(requester address), len(payload), timeout ms, reply tag, nbytes
_CONTROL = struct.Struct("<4sBBHIIQQ")
CONTROL_MAX_BYTES = 16384
MAX_ID_BYTES = 4096
# magic, version, status code, len(message), producer's nbytes
_STATUS = struct.Struct("<4sBBHQ")
STATUS_MAX_BYTES = 1024


# Control message ops (plain ints rather than an IntEnum: they are read on every message).
FETCH = 1
RELEASE = 2
# Status codes of a producer's answer.
OK = 0
UNKNOWN = 1
SIZE_MISMATCH = 2
FAILED = 3


def reply_tag(fetch_number: int) -> int:
    """The status tag of the ``fetch_number``-th fetch (its payload comes on ``data_tag``)."""
    return fetch_number << 1


def data_tag(reply: int) -> int:
    """The tag the payload of a fetch travels on, next to its status tag ``reply``."""
    return reply | 1


@dataclass(slots=True)
class ControlMessage:
    """A consumer's request to a producer, as it arrived."""

    op: int  # FETCH or RELEASE; anything else is ignored by the receiver
    requester: str  # the consumer's transport address
    payload: bytes  # FETCH: the tensor id (UTF-8); RELEASE: a JSON list of ids
    timeout_ms: int
    reply_tag: int
    nbytes: int

    @property
    def released_ids(self) -> list[str]:
        ids: list[str] = json.loads(self.payload)
        return ids


def encode_control(op: int, requester: bytes, reply: int, nbytes: int, timeout_s: float, payload: bytes) -> bytes:
    timeout_ms = int(max(0.0, min(timeout_s * 1000, 0xFFFFFFFF)))
    header = _CONTROL.pack(MAGIC, VERSION, op, len(requester), len(payload), timeout_ms, reply, nbytes)
    return header + requester + payload


def decode_control(buf: np.ndarray) -> ControlMessage:
    """Parse a control message received into ``buf``; DataPlaneError for an unknown format."""
    magic, version, op, addr_len, payload_len, timeout_ms, reply, nbytes = _CONTROL.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise DataPlaneError(f"a data-plane control message of unknown format {magic!r} v{version}")
    start = _CONTROL.size
    requester = buf[start : start + addr_len].tobytes().decode("ascii")
    payload = buf[start + addr_len : start + addr_len + payload_len].tobytes()
    return ControlMessage(op, requester, payload, timeout_ms, reply, nbytes)


def release_payloads(ids: list[str], requester: bytes) -> list[bytes]:
    """The payloads of the release messages for ``ids``, each small enough for one message."""
    limit = CONTROL_MAX_BYTES - _CONTROL.size - len(requester)
    return [json.dumps(chunk).encode("utf-8") for chunk in _chunks(ids, limit)]


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


@dataclass(slots=True)
class StatusMessage:
    """A producer's answer instead of a payload."""

    code: int  # OK, UNKNOWN, SIZE_MISMATCH or FAILED
    served_nbytes: int  # the producer's size of the tensor (0 when unknown)
    message: str


def encode_status(code: int, served_nbytes: int, message: str = "") -> bytes:
    text = message.encode("utf-8")[: STATUS_MAX_BYTES - _STATUS.size]
    return _STATUS.pack(MAGIC, VERSION, code, len(text), served_nbytes) + text


def decode_status(buf: np.ndarray) -> StatusMessage:
    magic, version, code, msg_len, served = _STATUS.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise DataPlaneError(f"the peer answered in an unknown format ({magic!r} v{version})")
    message = buf[_STATUS.size : _STATUS.size + msg_len].tobytes().decode("utf-8", "replace")
    return StatusMessage(code, served, message)
