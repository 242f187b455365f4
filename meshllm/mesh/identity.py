"""A peer's key seed, the mesh secret, and join tokens.

Files in the peer home are written owner-only: whoever reads ``secret`` can join the mesh.
Nothing here prints a secret: ``repr`` and ``str`` of a secret, and of a token holding one,
show the public ``mesh_id`` fingerprint only, so that a log line, an error message or a
traceback that shows values cannot leak it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import cbor2

from meshllm.errors import MeshError

IDENTITY_FILE = "identity.key"
SECRET_FILE = "secret"
TOKEN_PREFIX = "meshllm1-"


class IdentityError(MeshError):
    """A missing or damaged identity, secret or join token."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def _read_hex(path: Path, what: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise IdentityError(f"{path} not found: run `meshllm init` first") from None
    except ValueError:
        raise IdentityError(f"{path} is damaged: expected {size} hex-encoded bytes") from None
    if len(raw) != size:
        raise IdentityError(f"{path} is damaged: {what} must be {size} bytes")
    return raw


def create_identity(home: Path) -> bytes:
    seed = secrets.token_bytes(32)
    _write_private(home / IDENTITY_FILE, seed.hex().encode() + b"\n")
    return seed


def load_identity(home: Path) -> bytes:
    """The 32-byte seed the peer's Ed25519 key pair is derived from."""
    return _read_hex(home / IDENTITY_FILE, "the key seed", 32)


REDACTED = "<redacted>"


@dataclass(frozen=True)
class MeshSecret:
    """The shared secret every member holds; keys for each purpose are derived from it."""

    raw: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"MeshSecret({REDACTED}, id={self.mesh_id})"

    @classmethod
    def generate(cls) -> MeshSecret:
        return cls(secrets.token_bytes(32))

    def derive(self, purpose: str) -> bytes:
        return hmac.new(self.raw, b"meshllm/" + purpose.encode(), hashlib.sha256).digest()

    @property
    def pnet_key(self) -> bytes:
        """The libp2p private-network key: links only form between holders of the secret."""
        return self.derive("pnet")

    @property
    def auth_key(self) -> bytes:
        """Key of the application-level challenge-response run on every new connection."""
        return self.derive("auth")

    @property
    def mesh_id(self) -> str:
        """A public fingerprint of the secret, safe to show and log."""
        return self.derive("id")[:6].hex()

    def save(self, home: Path) -> None:
        _write_private(home / SECRET_FILE, self.raw.hex().encode() + b"\n")

    @classmethod
    def load(cls, home: Path) -> MeshSecret:
        return cls(_read_hex(home / SECRET_FILE, "the mesh secret", 32))


@dataclass(frozen=True)
class JoinToken:
    """What a new peer needs to join: the secret and where to reach a member."""

    secret: MeshSecret = field(repr=False)
    addrs: tuple[str, ...]

    def __repr__(self) -> str:
        # The encoded token *is* the secret: only its fingerprint and the addresses show.
        return f"JoinToken({REDACTED}, id={self.secret.mesh_id}, addrs={self.addrs!r})"

    def encode(self) -> str:
        body = cbor2.dumps({"s": self.secret.raw, "a": list(self.addrs)})
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise IdentityError("not a meshllm join token (it should start with 'meshllm1-')")
        body = text[len(TOKEN_PREFIX) :]
        try:
            raw = cbor2.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            secret, addrs = raw["s"], raw["a"]
            if not isinstance(secret, bytes) or len(secret) != 32:
                raise ValueError("bad secret")
            if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
                raise ValueError("bad addresses")
        except Exception:
            raise IdentityError("the join token is damaged (was it copied completely?)") from None
        return cls(MeshSecret(secret), tuple(addrs))
