"""``setup_triton`` for real: the installed server starts and a Python-backend model answers.

Uses the default Triton home, so the installation is shared with the other Triton tests and
installed once per machine (CI included).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline_runner.triton.environment import TritonInstallation, find_triton, setup_triton

from .conftest import REPO_ROOT, free_port

# The first setup downloads about 60 MB; that can outlast the default 300 s timeout on a slow link.
pytestmark = [pytest.mark.triton, pytest.mark.timeout(900)]

IDENTITY_CONFIG = """
name: "identity"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]
output [
  { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ -1 ] },
  { name: "NUMPY_VERSION", data_type: TYPE_STRING, dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

IDENTITY_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        version = np.array([np.__version__.encode()], dtype=np.object_)
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            outputs = [pb_utils.Tensor("OUTPUT0", data.copy()), pb_utils.Tensor("NUMPY_VERSION", version)]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
"""


@pytest.fixture(scope="module")
def installation() -> TritonInstallation:
    return setup_triton()



def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def server(installation: TritonInstallation, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A started tritonserver with an empty repository (explicit model control): (host:port, repo)."""
    repo = tmp_path / "models"
    repo.mkdir()
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(installation.server),
                f"--model-repository={repo}",
                f"--backend-directory={installation.backend_dir}",
                "--model-control-mode=explicit",
                "--http-address=127.0.0.1",
                f"--http-port={http_port}",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={grpc_port}",
                "--allow-metrics=false",
            ],
            env=installation.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        started = time.monotonic()
        ready_url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        while not _ready(ready_url):
            assert proc.poll() is None, f"tritonserver exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() - started < 60, f"tritonserver not ready after 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        print(f"tritonserver ready in {time.monotonic() - started:.2f} s")
        yield f"127.0.0.1:{http_port}", repo
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_setup_installs_a_server_and_a_numpy1_model_environment(installation: TritonInstallation) -> None:
    assert installation.server.name == "tritonserver" and installation.server.is_file()
    stub = installation.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.is_file() and (installation.backend_dir / "python" / "libtriton_python.so").is_file()
    found = find_triton()
    assert found is not None and (found.server, found.backend_dir, found.source) == (
        installation.server, installation.backend_dir, installation.source
    )  # fmt: skip
    if installation.model_python is None:  # a system tritonserver (NVIDIA's container): no model env
        return
    assert installation.env["PATH"].split(":")[0] == str(installation.model_python.parent)
    version = subprocess.run(
        ["python", "-c", "import numpy; print(numpy.__version__)"],
        env=installation.env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    assert int(version.split(".")[0]) < 2, f"the model environment has numpy {version}"


def test_a_second_setup_returns_at_once(installation: TritonInstallation) -> None:
    messages: list[str] = []
    started = time.monotonic()
    again = setup_triton(progress=messages.append)
    assert time.monotonic() - started < 2.0
    assert messages == []  # nothing installed, nothing even waited for
    assert again.server == installation.server and again.backend_dir == installation.backend_dir


def test_a_python_backend_model_answers(server: tuple[str, Path]) -> None:
    import tritonclient.http as httpclient

    url, repo = server
    (repo / "identity" / "1").mkdir(parents=True)
    (repo / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (repo / "identity" / "1" / "model.py").write_text(IDENTITY_MODEL)
    client = httpclient.InferenceServerClient(url)
    try:
        client.load_model("identity")
        assert client.is_model_ready("identity")
        data = np.arange(16, dtype=np.int32)
        inputs = [httpclient.InferInput("INPUT0", list(data.shape), "INT32")]
        inputs[0].set_data_from_numpy(data)
        result = client.infer("identity", inputs)
        # With numpy 2 in the model's Python, outputs come back empty: equality proves numpy < 2.
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        numpy_version = result.as_numpy("NUMPY_VERSION")[0].decode()
        assert int(numpy_version.split(".")[0]) < 2, numpy_version
    finally:
        client.close()


def test_runner_triton_setup_prints_the_server(installation: TritonInstallation) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_runner.cli", "triton", "setup"],
        capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(installation.server) in result.stdout
    assert installation.source in result.stdout
