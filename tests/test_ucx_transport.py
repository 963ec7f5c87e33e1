"""UcxTransport between real processes: producers run tests/fixture_operators/ucx_peer.py in their
own processes, the consumer runs here. No mocks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from pipeline_runner.data_plane import wire
from pipeline_runner.data_plane.errors import DataPlaneError
from pipeline_runner.data_plane.peers import HostIdentity, PeerAddress, describe
from pipeline_runner.data_plane.ucx_transport import UcxTransport

from .conftest import TESTS_DIR
from .fixture_operators.ucx_peer import PREFIX, pattern

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


class Producer:
    """A UcxTransport in a subprocess, serving what ``put`` gives it."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.address = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _answer(self, timeout_s: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"ucx peer {self.pid} exited (code {await self.proc.wait()})")
                if line.startswith(PREFIX):
                    answer: dict[str, Any] = json.loads(line[len(PREFIX) :])
                    return answer

    async def cmd(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._answer()

    async def put(self, tensor_id: str, size: int, seed: int = 0) -> np.ndarray:
        await self.cmd(cmd="put", id=tensor_id, size=size, seed=seed)
        return pattern(size, seed)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


@asynccontextmanager
async def producer(*args: str) -> AsyncIterator[Producer]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fixture_operators.ucx_peer", *args,
        cwd=TESTS_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    peer = Producer(proc)
    try:
        peer.address = (await peer._answer())["address"]
        yield peer
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.fixture
async def consumer() -> AsyncIterator[UcxTransport]:
    transport = UcxTransport(lambda _: None)
    await transport.start()
    yield transport
    await transport.stop()


async def test_bytes_of_every_size_arrive_intact(consumer: UcxTransport) -> None:
    sizes = [0, 1, 1024, MiB, 64 * MiB]
    async with producer() as peer:
        for seed, size in enumerate(sizes):
            expected = await peer.put(f"t{size}", size, seed)
            out = np.empty(size, np.uint8)
            await consumer.fetch(peer.address, f"t{size}", out, 10.0)
            assert np.array_equal(out, expected), f"{size} bytes arrived corrupted"
        served = await peer.cmd(cmd="stats")
    assert consumer.stats["fetches"] == len(sizes)
    assert consumer.stats["bytes_fetched"] == sum(sizes)
    assert served["fetches_served"] == len(sizes)
    assert served["bytes_served"] == sum(sizes)


async def test_fetch_fills_any_writable_contiguous_array(consumer: UcxTransport) -> None:
    async with producer() as peer:
        expected = await peer.put("x", 4096, seed=3)
        out = np.empty((16, 64), np.float32)  # same bytes, other dtype and shape
        await consumer.fetch(peer.address, "x", out, 5.0)
        assert out.tobytes() == expected.tobytes()
        with pytest.raises(DataPlaneError, match="writable"):
            readonly = np.empty(4096, np.uint8)
            readonly.flags.writeable = False
            await consumer.fetch(peer.address, "x", readonly, 5.0)
        with pytest.raises(DataPlaneError, match="contiguous"):
            await consumer.fetch(peer.address, "x", np.empty(8192, np.uint8)[::2], 5.0)


async def test_32_concurrent_fetches_to_one_and_to_two_peers(consumer: UcxTransport) -> None:
    async with producer() as first, producer() as second:
        expected = {}
        for i in range(32):
            peer = first if i % 2 else second
            expected[i] = (peer, await peer.put(f"c{i}", MiB, seed=100 + i))
        outs = {i: np.empty(MiB, np.uint8) for i in expected}
        # 32 at once from one peer (ids of `first` fetched twice over), then 32 across both.
        one_peer = [i for i in expected if expected[i][0] is first] * 2
        spare = [np.empty(MiB, np.uint8) for _ in one_peer]
        await asyncio.gather(*(consumer.fetch(first.address, f"c{i}", out, 10.0) for i, out in zip(one_peer, spare)))
        for i, out in zip(one_peer, spare):
            assert np.array_equal(out, expected[i][1])
        await asyncio.gather(*(consumer.fetch(expected[i][0].address, f"c{i}", outs[i], 10.0) for i in expected))
        for i, (_, data) in expected.items():
            assert np.array_equal(outs[i], data), f"fetch {i} arrived corrupted"
        assert consumer.stats["fetches"] == 64
        # One endpoint per peer, reused by every fetch.
        assert sorted(consumer.peers) == sorted([first.address, second.address])


async def test_unknown_or_freed_id_fails_fast_and_names_it(consumer: UcxTransport) -> None:
    async with producer() as peer:
        for size in (0, 16, 4 * MiB):
            started = time.monotonic()
            with pytest.raises(DataPlaneError, match="no-such-tensor"):
                await consumer.fetch(peer.address, "no-such-tensor", np.empty(size, np.uint8), 30.0)
            assert time.monotonic() - started < 2.0
        await peer.put("freed-tensor", 1024)
        await peer.cmd(cmd="free", id="freed-tensor")
        with pytest.raises(DataPlaneError, match="freed-tensor"):
            await consumer.fetch(peer.address, "freed-tensor", np.empty(1024, np.uint8), 30.0)
        await peer.put("sized", 1024)
        with pytest.raises(DataPlaneError, match="size mismatch.*1024 bytes.*expects 1000"):
            await consumer.fetch(peer.address, "sized", np.empty(1000, np.uint8), 30.0)
        # The endpoint is still fine after refusals.
        out = np.empty(1024, np.uint8)
        await consumer.fetch(peer.address, "sized", out, 5.0)
        assert np.array_equal(out, pattern(1024, 0))


async def test_killed_producer_fails_fetches_within_the_timeout(consumer: UcxTransport) -> None:
    async with producer() as peer:
        await peer.put("big", 64 * MiB)
        await consumer.fetch(peer.address, "big", np.empty(64 * MiB, np.uint8), 10.0)  # endpoint cached
        peer.signal(signal.SIGSTOP)  # requests now stay unanswered
        pending = [
            asyncio.create_task(consumer.fetch(peer.address, "big", np.empty(64 * MiB, np.uint8), 20.0))
            for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        peer.signal(signal.SIGKILL)
        for task in pending:
            with pytest.raises(DataPlaneError, match=f"peer process {peer.pid}"):
                await task
        assert time.monotonic() - started < 2.0, "a dead producer must not cost the whole timeout"
        started = time.monotonic()
        with pytest.raises(DataPlaneError, match=f"peer process {peer.pid}"):
            await consumer.fetch(peer.address, "big", np.empty(64 * MiB, np.uint8), 20.0)
        assert time.monotonic() - started < 1.0
        assert peer.address not in consumer.peers  # the endpoint was dropped
    async with producer() as other:  # the consumer still works
        expected = await other.put("x", MiB, seed=7)
        out = np.empty(MiB, np.uint8)
        await consumer.fetch(other.address, "x", out, 5.0)
        assert np.array_equal(out, expected)


async def test_producer_killed_mid_transfer_leaves_the_consumer_alive(consumer: UcxTransport) -> None:
    async with producer() as peer:
        await peer.put("huge", 256 * MiB)
        outs = [np.empty(256 * MiB, np.uint8) for _ in range(2)]
        fetches = [asyncio.create_task(consumer.fetch(peer.address, "huge", out, 20.0)) for out in outs]
        await asyncio.sleep(0.03)
        peer.signal(signal.SIGKILL)
        results = await asyncio.gather(*fetches, return_exceptions=True)
        # Each either finished before the kill or failed cleanly: no hang, no crash of this process.
        assert all(r is None or isinstance(r, DataPlaneError) for r in results), results


async def test_a_peer_on_another_host_is_reached_over_tcp(consumer: UcxTransport) -> None:
    # The peer claims another host: no shared memory, no pid to watch, UCX error handling on.
    async with producer("--other-host") as peer:
        for seed, size in enumerate([0, 1024, 4 * MiB]):
            expected = await peer.put(f"t{size}", size, seed)
            out = np.empty(size, np.uint8)
            await consumer.fetch(peer.address, f"t{size}", out, 10.0)
            assert np.array_equal(out, expected)
        assert not consumer.peers[peer.address].local
        with pytest.raises(DataPlaneError, match="no-such-tensor"):
            await consumer.fetch(peer.address, "no-such-tensor", np.empty(8, np.uint8), 10.0)
        await peer.put("big", 64 * MiB)
        peer.signal(signal.SIGSTOP)
        pending = asyncio.create_task(consumer.fetch(peer.address, "big", np.empty(64 * MiB, np.uint8), 20.0))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        peer.signal(signal.SIGKILL)
        with pytest.raises(DataPlaneError):
            await pending
        assert time.monotonic() - started < 2.0  # UCX notices the closed connection
        with pytest.raises(DataPlaneError):
            await consumer.fetch(peer.address, "big", np.empty(64 * MiB, np.uint8), 20.0)


async def test_frozen_producer_times_out_then_recovers(consumer: UcxTransport) -> None:
    async with producer() as peer:
        expected = await peer.put("x", MiB, seed=5)
        await consumer.fetch(peer.address, "x", np.empty(MiB, np.uint8), 5.0)
        peer.signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(DataPlaneError, match="timed out after 0.5 s"):
            await consumer.fetch(peer.address, "x", np.empty(MiB, np.uint8), 0.5)
        assert 0.45 < time.monotonic() - started < 1.5
        cancelled = asyncio.create_task(consumer.fetch(peer.address, "x", np.empty(MiB, np.uint8), 0.5))
        await asyncio.sleep(0.1)
        cancelled.cancel()  # a caller giving up must not disturb later fetches
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        peer.signal(signal.SIGCONT)
        out = np.empty(MiB, np.uint8)
        await consumer.fetch(peer.address, "x", out, 5.0)
        assert np.array_equal(out, expected)


async def test_frozen_remote_producer_times_out_then_recovers_and_stop_closes_its_old_endpoint() -> None:
    # A peer on another host that misses a deadline gets a new endpoint; the old one is only
    # retired (closing it would reset the new one, see peers.py) until the transport stops.
    consumer = UcxTransport(lambda _: None)
    await consumer.start()
    try:
        async with producer("--other-host") as peer:
            expected = await peer.put("x", MiB, seed=7)
            peer.signal(signal.SIGSTOP)
            late = np.zeros(MiB, np.uint8)
            with pytest.raises(DataPlaneError, match="timed out after 0.5 s"):
                await consumer.fetch(peer.address, "x", late, 0.5)
            peer.signal(signal.SIGCONT)
            for _ in range(3):
                out = np.empty(MiB, np.uint8)
                await consumer.fetch(peer.address, "x", out, 5.0)
                assert np.array_equal(out, expected)
            assert not consumer.peers[peer.address].local
            started = time.monotonic()
            await consumer.stop()
            assert time.monotonic() - started < 2.0
    finally:
        await consumer.stop()


async def test_release_reaches_the_producers_on_release(consumer: UcxTransport) -> None:
    async with producer() as peer:
        ids = ["a", "b", "\u00e9t\u00e9"] + [f"many-{i:04d}" for i in range(2000)]  # > one message
        await consumer.release(peer.address, ids)
        deadline = time.monotonic() + 5.0
        while (released := (await peer.cmd(cmd="released"))["ids"]) != ids and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert released == ids
    await consumer.release(peer.address, ["gone"])  # a dead peer is ignored: fire and forget


async def test_stop_is_idempotent_and_ends_fetching() -> None:
    transport = UcxTransport(lambda _: None)
    await transport.stop()  # never started
    transport = UcxTransport(lambda _: None)
    await transport.start()
    await transport.start()
    address = transport.address
    async with producer() as peer:
        await peer.put("x", 1024)
        await transport.fetch(peer.address, "x", np.empty(1024, np.uint8), 5.0)
        assert (await peer.cmd(cmd="fetch", address=address, id="nothing", size=8))["error"].startswith(
            "DataPlaneError: unknown tensor id 'nothing'"
        )
        await transport.stop()
        await transport.stop()
        with pytest.raises(DataPlaneError, match="stopped"):
            await transport.fetch(peer.address, "x", np.empty(1024, np.uint8), 5.0)
        # A stopped transport no longer answers: its peers' fetches fail (UCX may notice the
        # closed endpoint; if not, the deadline ends them, as the process lives on).
        started = time.monotonic()
        answer = await peer.cmd(cmd="fetch", address=address, id="nothing", size=8, timeout=0.3)
        assert answer["error"].startswith("DataPlaneError")
        assert time.monotonic() - started < 2.0
        assert await peer.cmd(cmd="stop") == {"ok": True}  # stops twice inside


def test_importing_the_transport_does_not_import_ucxx() -> None:
    code = "import sys, pipeline_runner.data_plane.ucx_transport; assert 'ucxx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# ----------------------------------------------------------------- wire format and addresses (no UCX)


def test_a_control_message_arrives_as_it_was_sent() -> None:
    requester = b"ucx1:boot:ns:42:7:d29ya2Vy"
    encoded = wire.encode_control(wire.FETCH, requester, wire.reply_tag(5), 1 << 30, 2.5, "t\u00e9".encode())
    received = np.zeros(wire.CONTROL_MAX_BYTES, np.uint8)
    received[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    msg = wire.decode_control(received)
    assert (msg.op, msg.requester, msg.payload.decode()) == (wire.FETCH, requester.decode(), "t\u00e9")
    assert (msg.reply_tag, msg.nbytes, msg.timeout_ms) == (10, 1 << 30, 2500)
    assert wire.data_tag(msg.reply_tag) == 11  # the payload's tag sits next to the status tag


def test_a_status_message_is_cut_to_fit_its_buffer() -> None:
    encoded = wire.encode_status(wire.SIZE_MISMATCH, 1024, "x" * 5000)
    assert len(encoded) == wire.STATUS_MAX_BYTES
    received = np.empty(wire.STATUS_MAX_BYTES, np.uint8)
    received[:] = np.frombuffer(encoded, np.uint8)
    status = wire.decode_status(received)
    assert (status.code, status.served_nbytes) == (wire.SIZE_MISMATCH, 1024)
    header = len(wire.encode_status(wire.OK, 0))
    assert status.message == "x" * (wire.STATUS_MAX_BYTES - header)


def test_messages_in_an_unknown_format_are_refused() -> None:
    garbage = np.frombuffer(b"HTTP/1.1 200 OK\r\n" + bytes(64), np.uint8).copy()
    with pytest.raises(DataPlaneError, match="unknown format"):
        wire.decode_control(garbage)
    with pytest.raises(DataPlaneError, match="unknown format"):
        wire.decode_status(garbage)


def test_released_ids_are_split_into_messages_that_fit() -> None:
    requester = b"r" * 200
    ids = [f"id-{i:05d}-\u00e9" for i in range(3000)]
    payloads = wire.release_payloads(ids, requester)
    assert len(payloads) > 1
    header = len(wire.encode_control(wire.RELEASE, requester, 0, 0, 0.0, b""))
    assert all(header + len(p) <= wire.CONTROL_MAX_BYTES for p in payloads)
    assert [i for p in payloads for i in json.loads(p)] == ids
    with pytest.raises(DataPlaneError, match="too long"):
        wire.release_payloads(["x" * wire.CONTROL_MAX_BYTES], requester)


def test_a_peer_address_names_its_process_and_bad_ones_are_refused() -> None:
    address = PeerAddress(HostIdentity("boot-id", "4026531836"), 1234, "987", b"\x00worker\xff")
    assert PeerAddress.parse(str(address)) == address
    assert describe(str(address)) == "peer pid 1234 on host boot-id"
    for bad in ("", "tcp://127.0.0.1:4222", "ucx1:a:b:not-a-pid:0:AAAA", "ucx1:a:b:1:0:not base64!"):
        with pytest.raises(DataPlaneError, match="not a UCX data-plane address"):
            PeerAddress.parse(bad)
