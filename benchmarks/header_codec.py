"""Wire-header codec cost: the former pydantic models against protocol.py's msgspec Structs.

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
from typing import Annotated, Any, Literal, Union

import msgspec
from rich.console import Console
from rich.table import Table

from pydantic import BaseModel, ConfigDict, Field

from pipeline_runner import protocol
from pipeline_runner.protocol import ErrorInfo, InlineTensor, RequestHeader, ResponseHeader

# --- the pydantic models the headers were until issue 14 (for comparison) ---------------------


class _PWire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PInline(_PWire):
    kind: Literal["inline"] = "inline"
    name: str
    dtype: str
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    nbytes: int = Field(ge=0)
    offset: int = Field(ge=0)


class PRemote(_PWire):
    kind: Literal["remote"] = "remote"
    name: str
    dtype: str
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    nbytes: int = Field(ge=0)
    address: str
    tensor_id: str
    memory_type: Literal["cpu", "gpu"] = "cpu"
    device_id: int = 0


PDescriptor = Annotated[Union[PInline, PRemote], Field(discriminator="kind")]


class PError(_PWire):
    code: str
    message: str


class PRequest(_PWire):
    id: str
    reply_to: str
    timeout_s: float = Field(gt=0)
    parameters: dict[str, Any] = Field(default_factory=dict)
    tensors: list[PDescriptor] = Field(default_factory=list)
    trace_context: dict[str, str] | None = None
    sent_at: float | None = None


class PResponse(_PWire):
    id: str
    final: bool = True
    error: PError | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    tensors: list[PDescriptor] = Field(default_factory=list)
    worker: str | None = None
    attempt: int = Field(1, ge=1)


REQUEST_ID = "0f3c2a9b8d7e6f5a4b3c2d1e"
REPLY_TO = f"_INBOX.9a8b7c6d5e4f3a2b.{REQUEST_ID}"


def pydantic_request() -> bytes:
    tensor = PInline(name="input", dtype="<i4", shape=(1024,), offset=0, nbytes=4096)
    header = PRequest(id=REQUEST_ID, reply_to=REPLY_TO, timeout_s=29.99, parameters={"input_copies": 3}, tensors=[tensor])
    return header.model_dump_json(exclude_defaults=False).encode()


def pydantic_response() -> bytes:
    tensor = PInline(name="output", dtype="<i4", shape=(3072,), offset=0, nbytes=12288)
    header = PResponse(id=REQUEST_ID, final=True, error=None, parameters={}, tensors=[tensor], worker="encoder.0", attempt=1)
    return header.model_dump_json(exclude_defaults=False).encode()


# What protocol.py does now (its checks in __post_init__ included).
ENC = msgspec.json.Encoder()
REQ_DEC, RESP_DEC = msgspec.json.Decoder(RequestHeader), msgspec.json.Decoder(ResponseHeader)


def msgspec_request() -> bytes:
    tensor = InlineTensor(name="input", dtype="<i4", shape=(1024,), offset=0, nbytes=4096)
    return ENC.encode(RequestHeader(id=REQUEST_ID, reply_to=REPLY_TO, timeout_s=29.99, parameters={"input_copies": 3}, tensors=[tensor]))


def msgspec_response() -> bytes:
    tensor = InlineTensor(name="output", dtype="<i4", shape=(3072,), offset=0, nbytes=12288)
    return ENC.encode(ResponseHeader(id=REQUEST_ID, final=True, error=None, parameters={}, tensors=[tensor], worker="encoder.0", attempt=1))


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
    assert PRequest.model_validate_json(msgspec_request()) == PRequest.model_validate_json(pydantic_request())
    assert REQ_DEC.decode(pydantic_request()) == REQ_DEC.decode(msgspec_request())
    assert RESP_DEC.decode(pydantic_response()).tensors[0].nbytes == 12288
    assert ErrorInfo(code="x", message="y").code == PError(code="x", message="y").code
    assert protocol.RequestHeader is RequestHeader

    req_p, resp_p, req_m, resp_m = pydantic_request(), pydantic_response(), msgspec_request(), msgspec_response()
    cases = {
        "request: build + encode": (pydantic_request, msgspec_request),
        "request: decode + validate": (lambda: PRequest.model_validate_json(req_p), lambda: REQ_DEC.decode(req_m)),
        "response: build + encode": (pydantic_response, msgspec_response),
        "response: decode + validate": (lambda: PResponse.model_validate_json(resp_p), lambda: RESP_DEC.decode(resp_m)),
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
