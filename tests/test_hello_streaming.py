"""The hello_streaming example (frontend -> middle -> backend), deployed from its own file over NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

import pytest
import yaml

from pipeline_runner import Connection, DeploymentConfig, OperatorError
from pipeline_runner.config_loader import parse_deployment

from .conftest import REPO_ROOT, connected, running

DEPLOYMENT_FILE = REPO_ROOT / "deployments" / "hello_streaming.yaml"


def hello_streaming(**parameters: dict[str, Any]) -> DeploymentConfig:
    """deployments/hello_streaming.yaml, one worker each, with operator parameters overridden."""
    doc = yaml.safe_load(DEPLOYMENT_FILE.read_text())
    for operator in doc["operators"]:
        operator["workers"] = 1
        operator["parameters"] = {**operator.get("parameters", {}), **parameters.get(operator["name"], {})}
    return parse_deployment(yaml.safe_dump(doc), DEPLOYMENT_FILE)


async def stats_of(conn: Connection, operator: str) -> dict[str, Any]:
    (stats,) = [s for s in await conn.worker_stats(expected=3, timeout_s=2) if s["operator"] == operator]
    return stats


async def assert_every_stage_cancelled_and_the_backend_stopped(conn: Connection, words: int) -> None:
    """After a caller left mid-stream: each stage counted one cancel, and the backend sends no more words."""
    deadline = time.monotonic() + 5
    while (await stats_of(conn, "backend"))["cancelled"] != 1:
        assert time.monotonic() < deadline, "the backend never heard of the cancel"
        await asyncio.sleep(0.1)
    stopped_at = (await stats_of(conn, "backend"))["operator_stats"]["words_sent"]
    await asyncio.sleep(1.0)  # five more words' time
    assert (await stats_of(conn, "backend"))["operator_stats"]["words_sent"] == stopped_at < words
    assert [(await stats_of(conn, name))["cancelled"] for name in ("frontend", "middle")] == [1, 1]


async def generate(conn: Connection, text: Any, **call: Any) -> list[Any]:
    """Every response frontend sends for ``text``: the streamed ones, then the final one."""
    parameters = {} if text is None else {"text": text}
    return [response async for response in conn.operator("frontend").call(parameters=parameters, **call)]


def test_the_deployment_file_is_valid_and_serves_generate_over_http() -> None:
    config = parse_deployment(DEPLOYMENT_FILE.read_text(), DEPLOYMENT_FILE)
    assert [op.name for op in config.operators] == ["frontend", "middle", "backend"]
    assert config.http is not None
    assert (config.http.port, config.http.routes) == (8000, {"/generate": "frontend"})


async def test_curl_streams_the_words_over_http_as_the_readme_shows(nats_url: str) -> None:
    async with running(hello_streaming(backend={"delay": 0.2}), nats_url) as deployment:
        assert deployment.http_url is not None
        url = f"{deployment.http_url}/generate"
        readme = (REPO_ROOT / "README.md").read_text()
        shown = re.search(r"as newline-delimited JSON:\n\n```\n(.*?)```", readme, re.S)
        assert shown, "README lost the hello_streaming output"

        # The README's command as a user types it: no Content-Type, so curl says form-urlencoded.
        started = time.monotonic()
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-N", "-X", "POST", url, "-d", '{"text": "hello world"}',
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert curl.stdout is not None
        first_line = await asyncio.wait_for(curl.stdout.readline(), 10)
        first_at = time.monotonic() - started
        rest, _ = await asyncio.wait_for(curl.communicate(), 10)
        total = time.monotonic() - started
        assert curl.returncode == 0
        assert (first_line + rest).decode() == shown.group(1)
        # Word by word: the first word came a whole generation step before the end.
        assert total - first_at > 0.15

        sse = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-N", "-X", "POST", url, "-H", "Accept: text/event-stream",
            "-d", '{"text": "hello world"}', stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        events, _ = await asyncio.wait_for(sse.communicate(), 10)
        shown_sse = re.search(r"as Server-Sent Events:\n\n```\n(.*?)```", readme, re.S)
        assert shown_sse, "README lost the hello_streaming SSE output"
        assert events.decode() == shown_sse.group(1)


async def test_hello_world_streams_word_by_word_through_the_three_stages(nats_url: str) -> None:
    async with running(hello_streaming(backend={"delay": 0}), nats_url) as deployment, connected(deployment) as conn:
        responses = await generate(conn, "hello world")

        assert [(r.parameters, r.final) for r in responses] == [
            ({"text": "Frontend: Middle: Backend: hello"}, False),
            ({"text": "Frontend: Middle: Backend: world-mid-back"}, False),
            ({}, True),  # the end of the stream
        ]
        # What the README shows curl printing for the same text.
        readme = (REPO_ROOT / "README.md").read_text()
        shown = re.search(r"as newline-delimited JSON:\n\n```\n(.*?)```", readme, re.S)
        assert shown, "README lost the hello_streaming output"
        assert [json.loads(line) for line in shown.group(1).splitlines()] == [r.parameters for r in responses[:-1]]

        # Every word of a longer text, in order.
        words = [f"w{i}" for i in range(50)]
        texts = [r.parameters["text"] for r in await generate(conn, " ".join(words)) if not r.final]
        assert texts == [f"Frontend: Middle: Backend: {w}" for w in words[:-1]] + [
            f"Frontend: Middle: Backend: {words[-1]}-mid-back"
        ]


async def test_each_word_reaches_the_caller_while_the_backend_is_still_generating(nats_url: str) -> None:
    config = hello_streaming(backend={"delay": 0.3})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        sent_when_received: list[int] = []
        arrivals: list[float] = []
        async for response in conn.operator("frontend").call(parameters={"text": "one two three four five"}):
            arrivals.append(time.monotonic())
            sent_when_received.append((await stats_of(conn, "backend"))["operator_stats"]["words_sent"])

        assert len(arrivals) == 6  # five words and the end
        # The first word arrived before the backend had generated the rest: a stream, not a
        # batch delivered at the end; and the words did not all arrive at once.
        assert sent_when_received[0] < 5, sent_when_received
        assert arrivals[4] - arrivals[0] > 3 * 0.3 * 0.5


async def test_bad_input_is_a_bad_input_error_and_the_pipeline_keeps_serving(nats_url: str) -> None:
    config = hello_streaming(backend={"delay": 0}, frontend={"max_words": 5})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        for text, says in [
            (None, 'missing parameter "text"'),
            (42, 'parameter "text" must be a string, got int'),
            (["hello"], "must be a string, got list"),
            ("one two three four five six", "has 6 words, more than the 5 taken"),
            (" \n ", 'parameter "text" has no words'),
        ]:
            with pytest.raises(OperatorError) as caught:
                await generate(conn, text)
            assert (caught.value.code, caught.value.operator) == ("bad_input", "frontend")
            assert says in caught.value.message

        # Called directly, the later stages check their input too.
        with pytest.raises(OperatorError) as caught:
            await conn.operator("middle").infer(parameters={"text": 3.5})
        assert caught.value.code == "bad_input"

        texts = [r.parameters.get("text") for r in await generate(conn, "one two three four five")]
        assert texts[-2:] == ["Frontend: Middle: Backend: five-mid-back", None]
        for name in ("frontend", "middle", "backend"):
            assert deployment.workers[[w.spec.operator.name for w in deployment.workers].index(name)].restarts == 0


async def test_a_caller_leaving_mid_stream_stops_the_backend(nats_url: str) -> None:
    config = hello_streaming(backend={"delay": 0.2})
    words = 40  # 8 s of generation
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        received = 0
        stream = conn.operator("frontend").call(parameters={"text": " ".join(["word"] * words)})
        async with contextlib.aclosing(stream):
            async for _ in stream:
                received += 1
                if received == 2:
                    break  # the caller goes away

        await assert_every_stage_cancelled_and_the_backend_stopped(conn, words)
