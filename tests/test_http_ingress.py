"""The HTTP front door as its users meet it: ``runner deploy`` of a file with ``http:``, then curl,
httpx and tritonclient against the printed URL. One deployment serves the whole module: the
hello_world pipeline in Python, a three-hop streaming chain and operators that fail on purpose.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
import yaml

from .conftest import REPO_ROOT, interrupt

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
MAX_BODY = 1024 * 1024


def _ops(name: str) -> str:
    return f"tests.fixture_operators.{name}"


DEPLOYMENT = {
    "name": "http_front",
    "working_dir": str(REPO_ROOT),
    "http": {
        "port": 0,
        "workers": 2,
        "max_body_bytes": MAX_BODY,
        "request_timeout_s": 5,
        "routes": {"/chain": "hop1", "/generate": "answer"},
    },
    "operators": [
        {"name": "encoder", "implementation": "operators.hello_world.encoder:Encoder"},
        {"name": "decoder", "implementation": "operators.hello_world.decoder:Decoder"},
        {
            "name": "encoder_decoder",
            "implementation": "operators.hello_world.encoder_decoder:EncoderDecoder",
            "inputs": [{"name": "input", "datatype": "INT32", "shape": [-1]}],
            "outputs": [{"name": "output", "datatype": "INT32", "shape": [-1]}],
        },
        {"name": "hop1", "implementation": _ops("http_ops:Relay"), "parameters": {"next": "hop2"}},
        {"name": "hop2", "implementation": _ops("http_ops:Relay"), "parameters": {"next": "hop3"}},
        {"name": "hop3", "implementation": _ops("http_ops:Ticker")},
        {"name": "answer", "implementation": _ops("http_ops:Answer")},
        {"name": "echo", "implementation": _ops("echo:Echo")},
        {"name": "faulty", "implementation": _ops("echo:Faulty")},
        {
            "name": "narrow",  # one request at a time, none waiting: a second one is 'overloaded'
            "implementation": _ops("http_ops:Answer"),
            "max_inflight_requests": 1,
            "max_queued_requests": 0,
        },
        {
            "name": "crash",
            "implementation": _ops("echo:Crash"),
            "workers": 2,
            "delivery": {"idempotent": False, "redeliver_after_s": 0.5},
        },
    ],
}


@dataclass
class Running:
    url: str
    nats_url: str
    proc: subprocess.Popen[str]
    output: list[str]


def _deploy(path: Path, env: dict[str, str], timeout_s: float = 120) -> Running:
    """``runner deploy PATH`` in the background; returns once it printed its HTTP URL."""
    proc = subprocess.Popen(
        [*RUNNER, "deploy", str(path)], cwd=REPO_ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    urls: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while "HTTP" not in urls:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            proc.kill()
            raise AssertionError("runner deploy printed no HTTP URL:\n" + "".join(output)) from None
        for key in ("NATS", "HTTP"):
            if line.strip().startswith(f"{key}:"):
                urls[key] = line.split()[1]
    return Running(urls["HTTP"], urls["NATS"], proc, output)


def _stop(running: Running) -> None:
    if running.proc.poll() is None:
        interrupt(running.proc)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("http_front")
    path = tmp / "http_front.yaml"
    path.write_text(yaml.safe_dump(DEPLOYMENT))
    running = _deploy(path, dict(os.environ, PIPELINE_RUNNER_STATE_DIR=str(tmp / "state")))
    try:
        _wait_ready(running.url)
        yield running
    finally:
        _stop(running)


def _wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet, or (restarting) not accepting yet
        time.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _infer_body(values: list[int]) -> dict:
    return {"inputs": [{"name": "input", "datatype": "INT32", "shape": [len(values)], "data": values}]}


# --- health, metadata, Open Inference Protocol ----------------------------------------------------


def test_deploy_prints_the_url_and_the_health_endpoints_answer(front: Running) -> None:
    assert front.url.startswith("http://127.0.0.1:")
    live = httpx.get(f"{front.url}/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}
    assert len(live.headers["x-request-id"]) >= 16
    ready = httpx.get(f"{front.url}/v2/health/ready").json()
    assert ready["ready"] is True and ready["workers"]["encoder_decoder"] == 1
    server = httpx.get(f"{front.url}/v2").json()
    assert server["name"] == "pipeline_runner" and "binary_tensor_data" in server["extensions"]


def test_tritonclient_calls_encoder_decoder_with_json_and_binary_tensors(front: Running) -> None:
    client = triton_http.InferenceServerClient(front.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("encoder_decoder")
    metadata = client.get_model_metadata("encoder_decoder")
    assert metadata["inputs"] == [{"name": "input", "datatype": "INT32", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "INT32", "shape": [-1]}]

    # binary tensors both ways (tritonclient's default), large enough to cross the data plane
    x = np.random.default_rng(1).integers(-(2**31), 2**31 - 1, 100_000, dtype=np.int32)
    given = triton_http.InferInput("input", list(x.shape), "INT32")
    given.set_data_from_numpy(x)
    result = client.infer("encoder_decoder", [given])
    assert np.array_equal(result.as_numpy("output"), x)

    # JSON tensors both ways
    small = np.array([5, -7, 11], dtype=np.int32)
    given = triton_http.InferInput("input", [3], "INT32")
    given.set_data_from_numpy(small, binary_data=False)
    wanted = triton_http.InferRequestedOutput("output", binary_data=False)
    result = client.infer("encoder_decoder", [given], outputs=[wanted], model_version="1")
    assert result.get_response()["outputs"][0]["data"] == [5, -7, 11]
    assert np.array_equal(result.as_numpy("output"), small)


def test_tritonclient_sends_every_datatype_through_echo(front: Running) -> None:
    client = triton_http.InferenceServerClient(front.url.removeprefix("http://"))
    arrays = {
        "f32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "f16": np.array([0.5, -2.25], dtype=np.float16),
        "u8": np.arange(7, dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "words": np.array([b"hello", b"", b"w\xc3\xb6rld"], dtype=object),
    }
    inputs = []
    for name, array in arrays.items():
        datatype = triton_http.np_to_triton_dtype(array.dtype) if array.dtype != object else "BYTES"
        given = triton_http.InferInput(name, list(array.shape), datatype)
        given.set_data_from_numpy(array)
        inputs.append(given)
    result = client.infer("echo", inputs)
    for name, array in arrays.items():
        got = result.as_numpy(name)
        assert got.shape == array.shape and got.dtype == array.dtype and np.array_equal(got, array), name


def test_curl_gets_the_right_answer_from_the_oip_json_endpoint(front: Running) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{front.url}/v2/models/encoder_decoder/infer",
         "-H", "Content-Type: application/json", "-d", json.dumps(_infer_body([1, 2, 3]))],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    answer = json.loads(out)
    assert answer["model_name"] == "encoder_decoder"
    assert answer["outputs"] == [{"name": "output", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]}]


# --- JSON and streaming endpoints ------------------------------------------------------------------


def test_json_endpoint_takes_parameters_and_answers_json(front: Running) -> None:
    # as the README's curl sends it: no Content-Type (curl says form-urlencoded)
    out = subprocess.run(
        ["curl", "-sS", "-i", "-X", "POST", f"{front.url}/generate", "-d", '{"text": "hello world"}'],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    head, body = out.replace("\r\n", "\n").split("\n\n", 1)
    assert head.startswith("HTTP/1.1 200")
    assert "x-request-id:" in head.lower()
    assert json.loads(body) == {"text": "HELLO WORLD"}
    assert httpx.post(f"{front.url}/answer", json={"text": "abc"}).json() == {"text": "ABC"}


def test_a_streaming_operator_streams_sse_events_through_three_hops(front: Running) -> None:
    with httpx.stream(
        "POST", f"{front.url}/chain", json={"count": 3}, headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line]
    assert events == [{"index": i, "hops": ["hop1", "hop2"]} for i in range(3)]


def test_a_streaming_operator_streams_ndjson_without_an_sse_accept(front: Running) -> None:
    response = httpx.post(f"{front.url}/hop3", json={"count": 4})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in response.text.splitlines()] == [{"index": i} for i in range(4)]


def test_a_stream_failing_midway_ends_with_an_error_event(front: Running) -> None:
    sse = httpx.post(
        f"{front.url}/chain", json={"count": 2, "fail_at_end": True}, headers={"Accept": "text/event-stream"}
    )
    blocks = sse.text.strip().split("\n\n")
    assert [json.loads(b.removeprefix("data: ")) for b in blocks[:2]] == [
        {"index": i, "hops": ["hop1", "hop2"]} for i in range(2)
    ]
    event, data = blocks[2].split("\n")
    assert event == "event: error"
    error = json.loads(data.removeprefix("data: "))["error"]
    assert error["code"] == "operator_failed" and "the ticker broke" in error["message"]

    lines = httpx.post(f"{front.url}/hop3", json={"count": 1, "fail_at_end": True}).text.splitlines()
    assert json.loads(lines[0]) == {"index": 0}
    assert json.loads(lines[1])["error"]["code"] == "operator_failed"


# --- errors ----------------------------------------------------------------------------------------


def _error(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"] == "application/json"
    assert "x-request-id" in response.headers
    body = response.json()["error"]
    assert body["message"]
    return response.status_code, body["code"]


def test_every_failure_is_a_json_error_with_a_fitting_status(front: Running) -> None:
    url = front.url
    infer = f"{url}/v2/models/encoder_decoder/infer"
    assert _error(httpx.post(f"{url}/v2/models/nope/infer", json=_infer_body([1]))) == (404, "unknown_operator")
    assert _error(httpx.get(f"{url}/v2/models/nope")) == (404, "unknown_operator")
    assert _error(httpx.post(f"{url}/nowhere", json={})) == (404, "not_found")
    assert _error(httpx.get(f"{url}/generate")) == (405, "method_not_allowed")
    assert _error(httpx.post(infer, content=b"{not json")) == (400, "bad_json")
    assert _error(httpx.post(f"{url}/generate", content=b"[1, 2]")) == (400, "bad_json")
    wrong_shape = {"inputs": [{"name": "input", "datatype": "INT32", "shape": [4], "data": [1, 2]}]}
    assert _error(httpx.post(infer, json=wrong_shape)) == (400, "bad_tensor")
    bad_type = {"inputs": [{"name": "input", "datatype": "INT33", "shape": [1], "data": [1]}]}
    assert _error(httpx.post(infer, json=bad_type)) == (400, "bad_tensor")
    missing = {"inputs": [{"name": "wrong_name", "datatype": "INT32", "shape": [1], "data": [1]}]}
    assert _error(httpx.post(infer, json=missing)) == (400, "bad_input")
    assert _error(httpx.post(f"{url}/faulty", json={"mode": "bad_input"})) == (400, "bad_input")
    assert _error(httpx.post(f"{url}/faulty", json={"mode": "raise"})) == (500, "operator_failed")
    assert _error(httpx.post(infer, content=b"x" * (MAX_BODY + 1))) == (413, "too_large")
    slow = httpx.post(f"{url}/generate", json={"sleep": 5}, headers={"X-Request-Timeout": "0.5"})
    assert _error(slow) == (504, "timeout")
    assert _error(httpx.post(f"{url}/crash", json={"mode": "before"}, timeout=30)) == (503, "worker_lost")
    # the ingress is still serving
    assert httpx.post(f"{url}/generate", json={"text": "still here"}).json() == {"text": "STILL HERE"}


def test_an_operator_with_a_full_queue_answers_429_with_retry_after(front: Running) -> None:
    url = f"{front.url}/narrow"
    with httpx.Client(timeout=10) as client:
        busy = threading.Thread(target=client.post, args=(url,), kwargs={"json": {"sleep": 2}})
        busy.start()
        time.sleep(0.5)
        refused = client.post(url, json={})
        busy.join()
    assert _error(refused) == (429, "overloaded")
    assert refused.headers["retry-after"] == "1"


# --- a hostile or broken client --------------------------------------------------------------------


def _raw(url: str, data: bytes, read_timeout_s: float = 10) -> bytes:
    with socket.create_connection(_host_port(url), timeout=read_timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_garbage_wrong_content_types_and_huge_headers_get_errors_and_the_ingress_keeps_serving(front: Running) -> None:
    url = front.url
    rng = np.random.default_rng(7)
    for size in (1, 100, 10_000):
        garbage = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        for path in ("/v2/models/encoder_decoder/infer", "/generate", "/chain"):
            response = httpx.post(f"{url}{path}", content=garbage, headers={"Content-Type": "application/octet-stream"})
            assert _error(response)[0] == 400, (path, size)
    for content_type in ("text/xml", "multipart/form-data; boundary=x", "image/png"):
        response = httpx.post(f"{url}/generate", content=b"<a>1</a>", headers={"Content-Type": content_type})
        assert _error(response) == (400, "bad_json")
    lying = httpx.post(
        f"{url}/v2/models/encoder_decoder/infer", content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": "999"},
    )  # fmt: skip
    assert _error(lying) == (400, "bad_request")
    huge = httpx.get(f"{url}/v2/health/live", headers={"X-Junk": "j" * 200_000})
    assert huge.status_code == 431
    assert _raw(url, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert httpx.post(f"{url}/generate", json={"text": "ok"}).json() == {"text": "OK"}


def test_a_client_that_never_finishes_sending_is_cut_off_while_others_are_served(front: Running) -> None:
    host_port = _host_port(front.url)
    half_head = socket.create_connection(host_port)
    half_head.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
    half_body = socket.create_connection(host_port)
    half_body.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\":")
    try:
        started = time.monotonic()
        for _ in range(5):  # both ingress processes keep serving meanwhile
            assert httpx.post(f"{front.url}/generate", json={"text": "a"}).json() == {"text": "A"}
        half_body.settimeout(15)
        answer = half_body.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"body_timeout"' in answer
        half_head.settimeout(15)
        assert half_head.recv(65536) == b""  # closed: the head never came
        assert time.monotonic() - started < 14
    finally:
        half_head.close()
        half_body.close()


# --- cancellation ----------------------------------------------------------------------------------


def _recorded_cancel(path: Path, timeout_s: float = 5) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return float(path.read_text())
        time.sleep(0.02)
    raise AssertionError("the last operator of the chain never saw the cancel")


def test_a_client_disconnecting_mid_stream_cancels_the_last_of_three_hops_within_a_second(
    front: Running, tmp_path: Path
) -> None:
    record = tmp_path / "cancelled_at"
    params = {"count": 1000, "interval": 0.05, "record": str(record)}
    with httpx.stream("POST", f"{front.url}/chain", json=params, headers={"Accept": "text/event-stream"}) as response:
        lines = response.iter_lines()
        assert json.loads(next(line for line in lines if line).removeprefix("data: "))["index"] == 0
        disconnected_at = time.time()
    # leaving the block closed the connection mid-stream
    assert _recorded_cancel(record) - disconnected_at < 1.0


def test_a_client_disconnecting_before_the_answer_cancels_the_chain(front: Running, tmp_path: Path) -> None:
    record = tmp_path / "cancelled_at"
    body = json.dumps({"count": 1000, "interval": 0.05, "record": str(record)}).encode()
    with socket.create_connection(_host_port(front.url)) as sock:
        sock.sendall(b"POST /chain HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
        disconnected_at = time.time()
    assert _recorded_cancel(record) - disconnected_at < 1.0


def _start_chain(url: str, record: Path, request_id: str, out: list[str]) -> threading.Thread:
    """The three-hop stream in a thread; returns once its first event came back (the whole chain
    is at work), and collects its lines in ``out``."""
    params = {"count": 1000, "interval": 0.05, "record": str(record)}
    streaming = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{url}/chain", json=params, headers={"X-Request-Id": request_id}, timeout=20) as response:
            for line in response.iter_lines():
                out.append(line)
                streaming.set()
        streaming.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert streaming.wait(20), "the chain never streamed"
    return thread


def test_cancel_by_request_id_stops_the_chain_and_ends_the_stream_with_an_error(front: Running, tmp_path: Path) -> None:
    for method in ("POST", "DELETE"):
        record, out = tmp_path / f"cancelled_{method}", []
        request_id = f"test-cancel-{method.lower()}"
        thread = _start_chain(front.url, record, request_id, out)
        path = f"/v2/requests/{request_id}" + ("/cancel" if method == "POST" else "")
        # Two ingress processes share the port: whichever takes this asks the other over NATS.
        cancelled_at = time.time()
        response = httpx.request(method, f"{front.url}{path}")
        assert response.status_code == 200 and response.json() == {"cancelled": request_id}
        assert _recorded_cancel(record) - cancelled_at < 1.0
        thread.join(10)
        assert json.loads(out[-1])["error"]["code"] == "cancelled"
    assert _error(httpx.post(f"{front.url}/v2/requests/no-such-request/cancel")) == (404, "unknown_request")


def test_cancel_reaches_a_request_held_by_another_ingress_process(front: Running, tmp_path: Path) -> None:
    """A third ingress process on its own port: a cancel sent to it must cross over NATS."""
    from pipeline_runner.config import DeploymentConfig
    from pipeline_runner.http.spec import IngressSpec

    config = DeploymentConfig.model_validate(DEPLOYMENT)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.set_inheritable(True)
    spec = IngressSpec(
        deployment=config, root=str(REPO_ROOT), index=9, nats_url=front.nats_url,
        listen_fd=listener.fileno(), drain_timeout_s=2,
    )  # fmt: skip
    other = subprocess.Popen(
        [sys.executable, "-m", "pipeline_runner.http.process"], stdin=subprocess.PIPE, pass_fds=(listener.fileno(),),
        cwd=REPO_ROOT, text=True,
    )  # fmt: skip
    assert other.stdin is not None
    other.stdin.write(spec.model_dump_json())
    other.stdin.close()
    other_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        _wait_ready(other_url)
        record, out = tmp_path / "cancelled", []
        thread = _start_chain(front.url, record, "held-elsewhere", out)
        cancelled_at = time.time()
        response = httpx.delete(f"{other_url}/v2/requests/held-elsewhere")
        assert response.status_code == 200, response.text
        assert _recorded_cancel(record) - cancelled_at < 1.0
        thread.join(10)
        assert json.loads(out[-1])["error"]["code"] == "cancelled"
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait(10)
        listener.close()


# --- auth, drain and supervision (a deployment of their own) ---------------------------------------


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Running]:
    deployment = {
        "name": "http_guarded",
        "working_dir": str(REPO_ROOT),
        "http": {"port": 0, "auth": {"token_env": "TEST_HTTP_TOKEN"}},
        "operators": [{"name": "answer", "implementation": _ops("http_ops:Answer")}],
    }
    path = tmp_path / "guarded.yaml"
    path.write_text(yaml.safe_dump(deployment))
    env = dict(os.environ, PIPELINE_RUNNER_STATE_DIR=str(tmp_path / "state"), TEST_HTTP_TOKEN="s3cret-token")
    running = _deploy(path, env)
    try:
        _wait_ready(running.url)
        yield running
    finally:
        _stop(running)


def test_auth_drain_and_restart_of_an_ingress_process(guarded: Running) -> None:
    url = guarded.url
    good = {"Authorization": "Bearer s3cret-token"}
    assert _error(httpx.post(f"{url}/answer", json={"text": "x"})) == (401, "unauthorized")
    assert _error(httpx.post(f"{url}/answer", json={}, headers={"Authorization": "Bearer wrong"})) == (401, "unauthorized")
    assert _error(httpx.get(f"{url}/v2/models/answer", headers={"Authorization": "s3cret-token"})) == (401, "unauthorized")
    assert httpx.post(f"{url}/answer", json={"text": "x"}, headers=good).json() == {"text": "X"}
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # probes need no token
    assert "s3cret-token" not in "".join(guarded.output)

    # supervised: a killed ingress process is restarted and serves again
    ingress = [p for p in _children(guarded.proc.pid) if "pipeline_runner.http.process" in _cmdline(p)]
    assert len(ingress) == 1
    os.kill(ingress[0], signal.SIGKILL)
    _wait_ready(url)
    assert httpx.post(f"{url}/answer", json={"text": "y"}, headers=good).json() == {"text": "Y"}

    # drained on Ctrl-C: a request in flight still gets its answer
    out: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: out.append(httpx.post(f"{url}/answer", json={"text": "z", "sleep": 1.5}, headers=good, timeout=20))
    )
    thread.start()
    time.sleep(0.5)
    guarded.proc.send_signal(signal.SIGINT)
    thread.join(20)
    assert out and out[0].status_code == 200 and out[0].json() == {"text": "Z"}
    assert guarded.proc.wait(30) == 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_a_front_door_alone_answers_503_while_no_worker_serves(front: Running, tmp_path: Path) -> None:
    """`runner deploy --http-only` of a deployment whose operators run nowhere (yet)."""
    deployment = {
        "name": "http_ghost",
        "working_dir": str(REPO_ROOT),
        "http": {"port": 8000},  # overridden below
        "operators": [{"name": "answer", "implementation": _ops("http_ops:Answer")}],
    }
    path = tmp_path / "ghost.yaml"
    path.write_text(yaml.safe_dump(deployment))
    env = dict(os.environ, PIPELINE_RUNNER_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [*RUNNER, "deploy", str(path), "--http-only", "--http-port", "0", "--nats", front.nats_url],
        cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    ghost = Running("", front.nats_url, proc, [])
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            ghost.output.append(line)
            if line.strip().startswith("HTTP:"):
                ghost.url = line.split()[1]
                break
        assert ghost.url, "".join(ghost.output)
        ready = httpx.get(f"{ghost.url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "workers": {"answer": 0}}
        assert httpx.get(f"{ghost.url}/v2/models/answer/ready").status_code == 503
        # After three rounds of worker stats (a second each) without a worker of 'answer', its
        # requests are refused at once instead of waiting in its queue until their deadline.
        deadline = time.monotonic() + 15
        while True:
            refused = httpx.post(f"{ghost.url}/answer", json={"text": "anyone?"}, headers={"X-Request-Timeout": "1"})
            if _error(refused) == (503, "no_worker") or time.monotonic() > deadline:
                break
            assert _error(refused) == (504, "timeout")
        assert _error(refused) == (503, "no_worker")
        assert refused.headers["retry-after"] == "1"
    finally:
        _stop(ghost)
