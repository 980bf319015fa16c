"""Ed25519-signed policy bundles.

A bundle is JSON: the policy YAML verbatim, the signer's key id and the
signature over a domain-separated digest of the YAML bytes. Operators sign
offline (`python -m gateway policy sign`); the gateway accepts a bundle only
when the signature verifies against a key listed as trusted in its config.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

BUNDLE_FORMAT = "privacy-gateway-policy-bundle/1"
_DOMAIN = b"privacy-gateway policy v1\x00"


class BundleError(Exception):
    """A bundle that must be refused; the message says why."""


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    policy_yaml: str
    key_id: str
    signature: bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": BUNDLE_FORMAT,
                "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode(),
                "policy": self.policy_yaml,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> PolicyBundle:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"bundle is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"bundle format must be {BUNDLE_FORMAT!r}")
        try:
            return cls(
                policy_yaml=str(data["policy"]),
                key_id=str(data["key_id"]),
                signature=base64.b64decode(str(data["signature"]), validate=True),
            )
        except (KeyError, ValueError) as exc:
            raise BundleError(f"bundle field missing or malformed: {exc}") from exc


def _signed_bytes(policy_yaml: str) -> bytes:
    return _DOMAIN + hashlib.sha256(policy_yaml.encode("utf-8")).digest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair (PEM; private key mode 0600). Returns the key id."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(private.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def sign_policy(policy_yaml: str, private_key: Ed25519PrivateKey) -> PolicyBundle:
    return PolicyBundle(
        policy_yaml=policy_yaml,
        key_id=key_id(private_key.public_key()),
        signature=private_key.sign(_signed_bytes(policy_yaml)),
    )


def verify_bundle(bundle: PolicyBundle, trusted: dict[str, Ed25519PublicKey]) -> None:
    """Raise BundleError unless a trusted key signed exactly this policy text."""
    public = trusted.get(bundle.key_id)
    if public is None:
        raise BundleError(
            f"unknown signing key {bundle.key_id!r}: not in the trusted operator keys"
        )
    try:
        public.verify(bundle.signature, _signed_bytes(bundle.policy_yaml))
    except InvalidSignature as exc:
        raise BundleError("signature does not verify: the policy or signature was altered") from exc
