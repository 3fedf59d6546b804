"""Keys and the cryptography built on them.

One master key (CARDCHECK_MASTER_KEY, base64 of 32 bytes; on the embedded default generated
once into CARDCHECK_DATA_DIR/keys/master.key). Purpose-bound subkeys are derived from it with
HKDF, so a key for hashing phone numbers can never decrypt a report."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cardcheck.runtime.settings import SettingsError

NONCE_BYTES = 12


def _decode_master(text: str, origin: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise SettingsError(f"{origin} is not base64") from None
    if len(key) != 32:
        raise SettingsError(f"{origin} must hold 32 bytes, holds {len(key)}")
    return key


def read_master_key(configured: str | None, data_dir: Path) -> bytes | None:
    """The key `load_master_key` would use, never made here: None when there is none yet."""
    if configured:
        return _decode_master(configured, "CARDCHECK_MASTER_KEY")
    path = data_dir / "keys" / "master.key"
    return _decode_master(path.read_text(), str(path)) if path.exists() else None


def load_master_key(configured: str | None, data_dir: Path) -> bytes:
    if configured:
        return _decode_master(configured, "CARDCHECK_MASTER_KEY")
    path = data_dir / "keys" / "master.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        candidate = path.with_suffix(f".{os.getpid()}.tmp")
        candidate.write_text(base64.b64encode(AESGCM.generate_key(256)).decode() + "\n")
        candidate.chmod(0o600)
        try:
            # link() fails if another process won the race: everyone then reads the winner's key.
            os.link(candidate, path)
        except FileExistsError:
            pass
        finally:
            candidate.unlink()
    return _decode_master(path.read_text(), str(path))


class Keyring:
    def __init__(self, master_key: bytes) -> None:
        self._master = master_key

    def subkey(self, purpose: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(self._master)

    def sealer(self, purpose: str) -> Sealer:
        return Sealer(self.subkey(purpose))

    def hasher(self, purpose: str) -> KeyedHash:
        return KeyedHash(self.subkey(purpose))


class Sealer:
    """AES-GCM: nonce || ciphertext+tag. The associated data binds a ciphertext to its row."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, sealed: bytes, associated_data: bytes = b"") -> bytes:
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)


class KeyedHash:
    """HMAC-SHA256, for looking records up by a value (ID number, phone) never stored in clear."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
