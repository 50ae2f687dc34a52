"""A Kubernetes service-account issuer for the tests: real RSA and EC keys, tokens with the
claim layout of a projected ServiceAccount token, and its JWKS (and OpenID discovery document)
served over HTTP (or HTTPS, with a certificate of a CA made here) on 127.0.0.1 from a thread,
counting the requests it answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.certificates import make_ca, make_server_cert

AUDIENCE = "monogoto-broker"
JWKS_PATH = "/openid/v1/jwks"
DISCOVERY_PATH = "/.well-known/openid-configuration"


class SigningKey:
    """A private key, its key id and its public JWK."""

    def __init__(
        self, kid: str, private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, algorithm: str
    ) -> None:
        self.kid = kid
        self.private = private
        self.algorithm = algorithm
        public = private.public_key()
        self.public_pem: bytes = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        algorithm_class = jwt.get_algorithm_by_name(algorithm)
        self.jwk: dict[str, Any] = {
            **algorithm_class.to_jwk(public, as_dict=True),
            "kid": kid,
            "use": "sig",
            "alg": algorithm,
        }

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        """A new 2048-bit RSA key (RS256), as the API server uses by default."""
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        """A new EC P-256 key (ES256)."""
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


def claims(
    issuer: str,
    namespace: str,
    name: str,
    *,
    pod: str | None = "fleet-ingest-7d9f8-x2kqp",
    audience: str = AUDIENCE,
    lifetime: float = 3600,
    issued: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The claims of a projected ServiceAccount token bound to `pod` (a token bound to no pod
    has no `pod` claim), issued at `issued` (now) and valid for `lifetime` seconds."""
    now = int(time.time() if issued is None else issued)
    kubernetes: dict[str, Any] = {
        "namespace": namespace,
        "node": {"name": "node-a", "uid": str(uuid.uuid4())},
        "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
        "warnafter": now + int(lifetime * 0.8),
    }
    if pod is not None:
        kubernetes["pod"] = {"name": pod, "uid": str(uuid.uuid4())}
    return {
        "aud": [audience],
        "exp": now + int(lifetime),
        "iat": now,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": kubernetes,
        "nbf": now,
        "sub": f"system:serviceaccount:{namespace}:{name}",
        **overrides,
    }


def sign(key: SigningKey, payload: dict[str, Any], *, kid: str | None = None) -> str:
    """`payload` signed with `key`, its header naming `kid` (the key's own by default)."""
    return jwt.encode(
        payload, key.private, algorithm=key.algorithm, headers={"kid": kid or key.kid}
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    compact = json.dumps(header, separators=(",", ":")).encode()
    return f"{_b64(compact)}.{_b64(json.dumps(payload).encode())}"


def unsigned(payload: dict[str, Any], kid: str) -> str:
    """An `alg: none` token: no signature at all."""
    return _segments({"alg": "none", "typ": "JWT", "kid": kid}, payload) + "."


def hs256_with_public_key(key: SigningKey, payload: dict[str, Any]) -> str:
    """The classic forgery: HS256 with the issuer's public key (which anyone can fetch) used
    as the HMAC secret."""
    signing_input = _segments({"alg": "HS256", "typ": "JWT", "kid": key.kid}, payload)
    mac = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


class IssuerServer:
    """The JWKS (and discovery document) of the keys in `keys`, over HTTP on 127.0.0.1 (HTTPS
    with `tls`)."""

    def __init__(self, keys: list[SigningKey], tls: ssl.SSLContext | None = None) -> None:
        self.keys = list(keys)
        self.requests: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"{'http' if tls is None else 'https'}://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def jwks_url(self) -> str:
        """Where the JWKS is served."""
        return self.url + JWKS_PATH

    def start(self) -> IssuerServer:
        """Serve in a thread of its own."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: the JWKS becomes unreachable."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def fetches(self) -> int:
        """JWKS requests answered so far."""
        with self._lock:
            return self.requests[JWKS_PATH]

    def _document(self, path: str) -> dict[str, Any] | None:
        if path == JWKS_PATH:
            return {"keys": [key.jwk for key in self.keys]}
        if path == DISCOVERY_PATH:
            return {
                "issuer": self.url,
                "jwks_uri": self.jwks_url,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with issuer._lock:
                    issuer.requests[self.path] += 1
                    issuer.authorizations.append(self.headers.get("Authorization"))
                    document = issuer._document(self.path)
                body = json.dumps(document).encode()
                self.send_response(404 if document is None else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test's output is not the place for access logs

        return Handler


def certificate_authority(tmp_path: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A new CA's certificate (PEM, in `tmp_path`) and a server TLS context for 127.0.0.1 with
    a certificate it signed."""
    ca = make_ca(tmp_path, name)
    server = make_server_cert(ca, tmp_path, f"{name}-server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert_file, server.key_file)
    return ca.cert_file, context
