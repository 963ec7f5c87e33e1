"""NATS credentials and TLS: from the deployment file and the environment to connections.

Secrets are held as :class:`pydantic.SecretStr`, so they print as ``**********`` in reprs, logs
and ``runner validate``. They are revealed only when serialized to JSON for a worker's stdin, and
in the embedded server's config file (mode 0600), never on a command line.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, SecretStr, field_serializer

from .config import RequestPlaneConfig

ENV_PREFIX = "PIPELINE_RUNNER_NATS_"
_ENV_FIELDS = {
    "TOKEN": "token",
    "USER": "user",
    "PASSWORD": "password",
    "CREDS": "credentials_file",
    "NKEY_SEED": "nkey_seed_file",
    "TLS_CA": "tls_ca_file",
    "TLS_CERT": "tls_cert_file",
    "TLS_KEY": "tls_key_file",
}
_FILES = ("credentials_file", "nkey_seed_file", "tls_ca_file", "tls_cert_file", "tls_key_file")


class NatsClientOptions(BaseModel):
    """How one process authenticates to NATS and verifies it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = None
    user: str | None = None
    password: SecretStr | None = None
    credentials_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @field_serializer("token", "password", when_used="json")
    def _reveal(self, value: SecretStr | None) -> str | None:
        # JSON only travels to worker processes over their stdin pipe.
        return value.get_secret_value() if value is not None else None

    @classmethod
    def resolve(
        cls,
        config: RequestPlaneConfig | None = None,
        base_dir: Path | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> NatsClientOptions:
        """The deployment file's settings (paths relative to ``base_dir``), then the environment."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(config.auth.model_dump(exclude_none=True))
            values.update(
                {f"tls_{k}": v for k, v in config.tls.model_dump(exclude_none=True).items()}
            )
        for suffix, name in _ENV_FIELDS.items():
            if environ.get(ENV_PREFIX + suffix):
                values[name] = environ[ENV_PREFIX + suffix]
        for name in _FILES:
            if name in values and base_dir is not None:
                values[name] = str((base_dir / values[name]).resolve())
        return cls.model_validate(values)

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        kwargs: dict[str, Any] = {}
        if self.token is not None:
            kwargs["token"] = self.token.get_secret_value()
        if self.user is not None:
            kwargs["user"] = self.user
        if self.password is not None:
            kwargs["password"] = self.password.get_secret_value()
        if self.credentials_file:
            kwargs["user_credentials"] = self.credentials_file
        if self.nkey_seed_file:
            kwargs["nkeys_seed"] = self.nkey_seed_file
        context = self.ssl_context()
        if context is not None:
            kwargs["tls"] = context
        return kwargs


def embedded_server_config(options: NatsClientOptions, tls_cert: str | None, tls_key: str | None) -> str:
    """nats-server configuration requiring ``options``' credentials (and TLS with a certificate)."""
    lines: list[str] = []
    if options.token is not None:
        lines.append(f"authorization {{ token: {json.dumps(options.token.get_secret_value())} }}")
    elif options.user is not None:
        password = options.password.get_secret_value() if options.password else ""
        lines.append(
            f"authorization {{ user: {json.dumps(options.user)}, password: {json.dumps(password)} }}"
        )
    if tls_cert:
        lines.append(f"tls {{ cert_file: {json.dumps(tls_cert)}, key_file: {json.dumps(tls_key or '')} }}")
    return "\n".join(lines) + "\n"


def redact_url(url: str) -> str:
    """``url`` (or comma-separated URLs) with any password or token in it replaced by ``***``."""
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    parts = urlsplit(url)
    if parts.password is None and not parts.username:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))
