"""hello_world as shipped (Triton encoder and decoder): tritonclient over HTTP gets the right answer."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton_http

from pipeline_runner.config_loader import load_deployment

from .conftest import REPO_ROOT, running

pytestmark = pytest.mark.triton


async def test_tritonclient_calls_hello_world_on_triton_with_json_and_binary_data() -> None:
    config = load_deployment(REPO_ROOT / "deployments" / "hello_world.yaml")
    async with running(config) as deployment:
        assert deployment.http_url is not None
        client = triton_http.InferenceServerClient(deployment.http_url.removeprefix("http://"), network_timeout=60)
        assert client.is_server_live() and client.is_server_ready()
        metadata = client.get_model_metadata("encoder_decoder")
        assert metadata["inputs"] == [{"name": "input", "datatype": "INT32", "shape": [-1]}]
        x = np.random.default_rng(3).integers(-1000, 1000, 50_000, dtype=np.int32)
        for binary in (True, False):
            given = triton_http.InferInput("input", [x.size], "INT32")
            given.set_data_from_numpy(x, binary_data=binary)
            wanted = triton_http.InferRequestedOutput("output", binary_data=binary)
            result = client.infer("encoder_decoder", [given], outputs=[wanted])
            assert np.array_equal(result.as_numpy("output"), x), binary
