"""Transport security and client identity of the gRPC link.

TLS (and mutual TLS when a client CA is given) protects the link; a per-edge bearer token in the call metadata
names the client. The server never trusts the ``client_id`` a request claims when tokens are configured: the
token's client id replaces it, so budgets and accounting follow the authenticated identity. Tokens are compared
by SHA-256 digest, so the table holds no token in the clear after loading and a lookup does not leak by timing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import yaml

AUTH_HEADER = "authorization"


class SecurityConfigError(ValueError):
    """TLS or token settings that cannot work; the message names the flag."""


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise SecurityConfigError(f"{flag} {path}: no such file")
    return p.read_bytes()


def server_credentials(cert: str | None, key: str | None, client_ca: str | None, insecure: bool
                       ) -> grpc.ServerCredentials | None:
    """TLS credentials, or None for plaintext, which must be asked for explicitly."""
    if bool(cert) != bool(key):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    if not cert:
        if client_ca:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        if not insecure:
            raise SecurityConfigError("refusing to serve plaintext: give --tls-cert and --tls-key "
                                      "(and --tls-client-ca for mutual TLS), or --insecure to serve without TLS")
        return None
    ca = _read(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([(_read(key, "--tls-key"), _read(cert, "--tls-cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


class TokenTable:
    """token -> client id, loaded from a YAML or JSON mapping."""

    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise SecurityConfigError("the tokens table is empty")
        self._by_digest: dict[bytes, str] = {}
        for token, client in tokens.items():
            if not isinstance(token, str) or not isinstance(client, str) or len(token) < 8 or not client:
                raise SecurityConfigError("tokens must map tokens of at least 8 characters to non-empty client ids")
            self._by_digest[hashlib.sha256(token.encode()).digest()] = client

    @classmethod
    def load(cls, path: str) -> TokenTable:
        text = _read(path, "--tokens")
        assert text is not None
        try:
            data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise SecurityConfigError(f"--tokens {path}: not valid YAML/JSON ({exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("tokens"), dict):
            data = data["tokens"]
        if not isinstance(data, dict):
            raise SecurityConfigError(f"--tokens {path}: expected a mapping of token to client id")
        return cls({str(k): str(v) for k, v in data.items()})

    def identify(self, metadata: tuple | None) -> str | None:
        """The client id of the call's bearer token, or None when missing or unknown."""
        for k, v in metadata or ():
            if k == AUTH_HEADER and isinstance(v, str) and v.startswith("Bearer "):
                return self._by_digest.get(hashlib.sha256(v[7:].strip().encode()).digest())
        return None

