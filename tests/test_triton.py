"""``kind: triton`` operators with real Triton servers (one per worker) next to Python operators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline_runner import OperatorError, WorkerStartError
from pipeline_runner.client import make_inputs, run_load_test
from pipeline_runner.config_loader import load_deployment

from .conftest import REPO_ROOT, TESTS_DIR, connected, make_config, op, running

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODELS = str(TESTS_DIR / "fixture_triton_models")


def triton(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "kind": "triton", "repository": MODELS, **fields}


async def test_hello_world_on_triton_answers_100_of_100() -> None:
    config = load_deployment(REPO_ROOT / "deployments" / "hello_world.yaml")
    async with running(config) as deployment, connected(deployment, timeout_s=60) as conn:
        result = await run_load_test(
            conn.operator("encoder_decoder"), requests=100, concurrency=8, inputs=make_inputs(1024, "int32", 16)
        )
        assert (result.ok, result.failed, result.timed_out) == (100, 0, 0), result.errors
        stats = {s["worker"]: s for s in await conn.worker_stats(expected=len(deployment.workers))}
        assert stats["encoder.0"]["operator_stats"]["model"] == "encoder"
        assert stats["encoder.0"]["served"] + stats["encoder.1"]["served"] >= 100


async def test_a_python_operator_fans_out_to_two_triton_models(nats_url: str) -> None:
    config = make_config(triton("add"), triton("multiply"), op("divide", "fanout:Divide"))
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        rng = np.random.default_rng(3)
        for size in (1, 7, 1000):
            a = rng.uniform(1, 10, size).astype(np.float32)
            b = rng.uniform(1, 10, size).astype(np.float32)
            response = await conn.operator("divide").infer({"a": a, "b": b})
            np.testing.assert_allclose(await response.array("quotient"), (a + b) / (a * b), rtol=1e-6)


async def test_string_half_float_and_bool_tensors_cross_a_triton_operator(nats_url: str) -> None:
    config = make_config(triton("strings"))
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        text = np.array([b"ab", b"Triton", b""], dtype=object)
        num = np.array([0.5, 1.5, 3.0], dtype=np.float16)
        response = await conn.operator("strings").infer({"text": text, "num": num})
        assert list(await response.array("upper")) == [b"AB", b"TRITON", b""]
        np.testing.assert_array_equal(await response.array("twice"), num * 2)
        assert list(await response.array("flag")) == [False, True, True]


async def test_config_overrides_reach_tritons_model_config(nats_url: str) -> None:
    overrides = {
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "parameters": {"scale": {"string_value": "3"}},
    }
    config = make_config(triton("add", config_overrides=overrides))
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        [stats] = await conn.worker_stats(expected=1)
        assert stats["operator_stats"]["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
        assert stats["operator_stats"]["parameters"]["scale"] == "3"
        a, b = np.array([1, 2], np.float32), np.array([10, 20], np.float32)
        response = await conn.operator("add").infer({"a": a, "b": b})
        np.testing.assert_array_equal(await response.array("sum"), (a + b) * 3)


async def test_large_inputs_reach_triton_through_shared_memory_that_outlives_no_process(nats_url: str) -> None:
    config = make_config(triton("add"))
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        rng = np.random.default_rng(5)
        for size in (1 << 18, 1 << 20, 3 << 20):  # 1, 4 and 12 MiB per input
            a, b = rng.standard_normal(size).astype(np.float32), rng.standard_normal(size).astype(np.float32)
            response = await conn.operator("add").infer({"a": a, "b": b})
            np.testing.assert_array_equal(await response.array("sum"), a + b)
            response.release()
        [stats] = await conn.worker_stats(expected=1)
        assert stats["operator_stats"]["shared_memory_regions"] >= 2
        worker_pid = deployment.workers[0].pid
        # Region names are unlinked once Triton maps them: nothing of ours lingers in /dev/shm.
        assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"pr{worker_pid}_")]


async def test_a_decoupled_model_streams_its_responses(nats_url: str) -> None:
    config = make_config(triton("countdown"))
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        responses = [r async for r in conn.operator("countdown").call({"count": np.array([5], np.int32)})]
        assert [int((await r.array("index"))[0]) for r in responses] == [0, 1, 2, 3, 4]
        assert [r.final for r in responses] == [False] * 4 + [True]


async def test_wrong_input_dtype_is_a_bad_input_error_and_the_worker_keeps_serving(nats_url: str) -> None:
    config = make_config(triton("add"))
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        with pytest.raises(OperatorError) as caught:
            await conn.operator("add").infer({"a": np.zeros(3, np.int64), "b": np.zeros(3, np.float32)})
        assert caught.value.code == "bad_input" and "float32" in caught.value.message
        response = await conn.operator("add").infer({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)})
        np.testing.assert_array_equal(await response.array("sum"), [2, 2])


@pytest.mark.parametrize(
    ("model", "quoted"),
    [
        ("broken_config", "Error parsing text-format inference.ModelConfig"),
        ("raises_in_initialize", "weights file missing: /nonexistent/weights.bin"),
    ],
)
async def test_a_model_triton_cannot_load_fails_the_deploy_with_tritons_message(
    nats_url: str, model: str, quoted: str
) -> None:
    with pytest.raises(WorkerStartError) as caught:
        async with running(make_config(triton(model)), nats_url):
            pass
    message = str(caught.value)
    assert f"Triton could not load model '{model}'" in message
    assert quoted in message
