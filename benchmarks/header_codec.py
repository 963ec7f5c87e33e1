"""Wire-header codec cost: today's pydantic models against msgspec Structs of the same shape.

One hello_world request builds, encodes and decodes 4 request headers and 4 response headers
(caller -> encoder_decoder -> encoder, decoder). For each codec this measures, in CPU-µs
(``time.process_time``, so other load on the machine does not count), building a typical header
with one inline tensor descriptor, encoding it to JSON, and decoding it with validation.

    python benchmarks/header_codec.py [--repeat 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from rich.console import Console
from rich.table import Table

from pipeline_runner.protocol import ErrorInfo, InlineTensor, RequestHeader, ResponseHeader

# --- the same headers as msgspec Structs (what a switch would look like) --------------------

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class MInline(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="inline"):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: NonNegative
    offset: NonNegative


class MRemote(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="remote"):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: NonNegative
    address: str
    tensor_id: str
    memory_type: Literal["cpu", "gpu"] = "cpu"
    device_id: int = 0


class MError(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    message: str


class MRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    reply_to: str
    timeout_s: Annotated[float, msgspec.Meta(gt=0)]
    parameters: dict[str, Any] = {}
    tensors: list[MInline | MRemote] = []


class MResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    final: bool = True
    error: MError | None = None
    parameters: dict[str, Any] = {}
    tensors: list[MInline | MRemote] = []
    worker: str | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


REQUEST_ID = "0f3c2a9b8d7e6f5a4b3c2d1e"
REPLY_TO = f"_INBOX.9a8b7c6d5e4f3a2b.{REQUEST_ID}"


def pydantic_request() -> bytes:
    tensor = InlineTensor(name="input", dtype="<i4", shape=(1024,), offset=0, nbytes=4096)
    header = RequestHeader(id=REQUEST_ID, reply_to=REPLY_TO, timeout_s=29.99, parameters={"input_copies": 3}, tensors=[tensor])
    return header.model_dump_json(exclude_defaults=False).encode()


def pydantic_response() -> bytes:
    tensor = InlineTensor(name="output", dtype="<i4", shape=(3072,), offset=0, nbytes=12288)
    header = ResponseHeader(id=REQUEST_ID, final=True, error=None, parameters={}, tensors=[tensor], worker="encoder.0", attempt=1)
    return header.model_dump_json(exclude_defaults=False).encode()


REQ_ENC, REQ_DEC = msgspec.json.Encoder(), msgspec.json.Decoder(MRequest)
RESP_DEC = msgspec.json.Decoder(MResponse)


def msgspec_request() -> bytes:
    tensor = MInline(name="input", dtype="<i4", shape=(1024,), offset=0, nbytes=4096)
    return REQ_ENC.encode(MRequest(id=REQUEST_ID, reply_to=REPLY_TO, timeout_s=29.99, parameters={"input_copies": 3}, tensors=[tensor]))


def msgspec_response() -> bytes:
    tensor = MInline(name="output", dtype="<i4", shape=(3072,), offset=0, nbytes=12288)
    return REQ_ENC.encode(MResponse(id=REQUEST_ID, final=True, error=None, parameters={}, tensors=[tensor], worker="encoder.0", attempt=1))


def cpu_us(fn: Callable[[], object], repeat: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of CPU-µs per call."""
    samples = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(repeat):
            fn()
        samples.append((time.process_time() - t0) / repeat * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    # Both codecs read what the other writes (same JSON shape), so a switch keeps the wire format.
    assert RequestHeader.model_validate_json(msgspec_request()) == RequestHeader.model_validate_json(pydantic_request())
    assert REQ_DEC.decode(pydantic_request()) == REQ_DEC.decode(msgspec_request())
    assert RESP_DEC.decode(pydantic_response()).tensors[0].nbytes == 12288
    assert ErrorInfo(code="x", message="y").code == MError(code="x", message="y").code

    req_p, resp_p, req_m, resp_m = pydantic_request(), pydantic_response(), msgspec_request(), msgspec_response()
    cases = {
        "request: build + encode": (pydantic_request, msgspec_request),
        "request: decode + validate": (lambda: RequestHeader.model_validate_json(req_p), lambda: REQ_DEC.decode(req_m)),
        "response: build + encode": (pydantic_response, msgspec_response),
        "response: decode + validate": (lambda: ResponseHeader.model_validate_json(resp_p), lambda: RESP_DEC.decode(resp_m)),
    }
    rows = []
    for what, (p, m) in cases.items():
        rows.append({"what": what, "pydantic_us": cpu_us(p, args.repeat), "msgspec_us": cpu_us(m, args.repeat)})
    per_hop_p = sum(r["pydantic_us"] for r in rows)
    per_hop_m = sum(r["msgspec_us"] for r in rows)
    rows.append({"what": "one call (all four)", "pydantic_us": per_hop_p, "msgspec_us": per_hop_m})
    rows.append({"what": "hello_world request (4 calls)", "pydantic_us": 4 * per_hop_p, "msgspec_us": 4 * per_hop_m})

    table = Table(title=f"wire-header codec, CPU-µs per operation ({os.cpu_count()} CPUs)")
    for column in ("operation", "pydantic", "msgspec", "pydantic / msgspec"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for r in rows:
        table.add_row(r["what"], f"{r['pydantic_us']:.1f}", f"{r['msgspec_us']:.1f}", f"{r['pydantic_us'] / r['msgspec_us']:.1f}")
    Console(width=120).print(table)
    print(f"request header {len(req_p)} B (pydantic) / {len(req_m)} B (msgspec); response {len(resp_p)} / {len(resp_m)} B")
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
