"""Credentials and TLS on the request plane; secrets stay out of logs, state and command lines."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline_runner import Connection, RunnerError
from pipeline_runner.nats_security import NatsClientOptions, redact_url

from .conftest import REPO_ROOT, make_config, op, running

TOKEN = "tok-3f9a8c1d2e"


async def test_a_client_without_the_token_is_refused_and_one_with_it_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(op("echo", "echo:Echo"), request_plane={"auth": {"token": TOKEN}})
    async with running(config) as deployment:
        assert deployment.nats_url is not None
        with pytest.raises(RunnerError) as refused:
            await Connection.connect(deployment.nats_url, "test", nats=NatsClientOptions())
        assert "Authorization Violation" in str(refused.value)
        assert "PIPELINE_RUNNER_NATS_TOKEN" in str(refused.value)
        assert TOKEN not in str(refused.value)

        monkeypatch.setenv("PIPELINE_RUNNER_NATS_TOKEN", TOKEN)
        async with await Connection.connect(deployment.nats_url, "test") as conn:
            response = await conn.operator("echo").infer({"x": np.arange(3)})
            assert list(await response.array("x")) == [0, 1, 2]

        # The token never shows on a command line (ps) of the server or the workers.
        for pid in [deployment.state().nats_pid, *(w.pid for w in deployment.workers)]:
            assert pid is not None
            assert TOKEN not in " ".join(psutil.Process(pid).cmdline())
        log_dir, run_dir = deployment.log_dir, deployment.run_dir
    for path in [*log_dir.glob("*.log"), *run_dir.glob("nats/*.log")]:
        assert TOKEN not in path.read_text(errors="replace"), path


def test_validate_and_reprs_mask_secrets(tmp_path: Path) -> None:
    file = tmp_path / "secret.yaml"
    file.write_text(
        "name: secret\n"
        f"working_dir: {REPO_ROOT / 'tests'}\n"
        "request_plane:\n"
        f"  auth: {{user: alice, password: {TOKEN}}}\n"
        "operators:\n"
        "  - name: echo\n"
        "    implementation: fixture_operators.echo:Echo\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_runner.cli", "validate", str(file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    options = NatsClientOptions(user="alice", password=TOKEN)
    assert TOKEN not in repr(options) and TOKEN not in str(options)
    assert redact_url(f"nats://alice:{TOKEN}@10.0.0.1:4222") == "nats://alice:***@10.0.0.1:4222"


def test_environment_variables_override_the_deployment_file(tmp_path: Path) -> None:
    config = make_config(op("echo", "echo:Echo"), request_plane={"auth": {"token": "from-file"}, "tls": {"ca_file": "ca.pem"}})
    options = NatsClientOptions.resolve(
        config.request_plane, tmp_path, environ={"PIPELINE_RUNNER_NATS_TOKEN": "from-env"}
    )
    assert options.token is not None and options.token.get_secret_value() == "from-env"
    assert options.tls_ca_file == str(tmp_path / "ca.pem")


def _make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 / localhost signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pipeline_runner test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


async def test_a_request_round_trips_over_tls_with_a_ca_made_in_the_test(tmp_path: Path) -> None:
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    config = make_config(
        op("echo", "echo:Echo"),
        request_plane={
            "embedded": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
            "tls": {"ca_file": str(ca)},
        },
    )
    async with running(config) as deployment:
        assert deployment.nats_url is not None
        with pytest.raises(RunnerError, match="CERTIFICATE_VERIFY_FAILED"):  # no CA: no trust
            await Connection.connect(deployment.nats_url, "test", nats=NatsClientOptions())
        async with await Connection.connect(
            deployment.nats_url, "test", nats=NatsClientOptions(tls_ca_file=str(ca))
        ) as conn:
            response = await conn.operator("echo").infer({"x": np.arange(4)})
            assert list(await response.array("x")) == [0, 1, 2, 3]
