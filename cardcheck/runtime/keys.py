"""Keys and the cryptography built on them.

One master key (CARDCHECK_MASTER_KEY, base64 of 32 bytes; on the embedded default generated
once into CARDCHECK_DATA_DIR/keys/master.key). Purpose-bound subkeys are derived from it with
HKDF, so a key for hashing phone numbers can never decrypt a report.

Rotation: a new master key seals and hashes everything new at once, while the keys it replaced
(CARDCHECK_RETIRED_MASTER_KEYS, base64, comma-separated; on the embedded default the files in
keys/retired/, which `cardcheck keys rotate` moves the old key to) still open and match what
they protected. Each service's `rewrap` command then seals and hashes its rows again under the
current key; after that the retired keys can be destroyed."""

from __future__ import annotations

import base64
import hmac
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cardcheck.runtime.files import private_directory, tighten_if_present, write_new_private
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


def read_retired_keys(configured: str | None, data_dir: Path) -> tuple[bytes, ...]:
    """The master keys a rotation retired: CARDCHECK_RETIRED_MASTER_KEYS (base64, comma-separated)
    when set, else every file in data_dir/keys/retired, newest first."""
    if configured:
        return tuple(
            _decode_master(text, f"CARDCHECK_RETIRED_MASTER_KEYS entry {n}")
            for n, text in enumerate(configured.split(","), 1)
            if text.strip()
        )
    retired = data_dir / "keys" / "retired"
    if not retired.is_dir():
        return ()
    return tuple(_decode_master(path.read_text(), str(path)) for path in sorted(retired.glob("*.key"), reverse=True))


def load_keyring(master_key: str | None, retired_master_keys: str | None, data_dir: Path) -> Keyring:
    """The service's keyring: the current master key (made on the embedded default when there is
    none yet) and the retired ones."""
    return Keyring(load_master_key(master_key, data_dir), read_retired_keys(retired_master_keys, data_dir))


def rotate_master_key(data_dir: Path, now: datetime) -> Path:
    """The embedded default's rotation: keys/master.key moves to keys/retired/<instant>.key and a
    new one takes its place (made when a service next loads it). Returns the retired file.
    With CARDCHECK_MASTER_KEY in use the operator rotates the Secret instead."""
    path = data_dir / "keys" / "master.key"
    if not path.exists():
        raise FileNotFoundError(f"no master key at {path}")
    _decode_master(path.read_text(), str(path))
    retired = private_directory(data_dir / "keys" / "retired")
    target = retired / f"{now.strftime('%Y%m%dT%H%M%S%fZ')}.key"
    os.link(path, target)  # fails rather than overwrite a retired key
    path.unlink()
    load_master_key(None, data_dir)
    return target


def load_master_key(configured: str | None, data_dir: Path) -> bytes:
    if configured:
        return _decode_master(configured, "CARDCHECK_MASTER_KEY")
    path = data_dir / "keys" / "master.key"
    _private_keys(data_dir)
    if not path.exists():
        candidate = path.with_suffix(f".{os.getpid()}.tmp")
        # 0600 from its first byte: never a moment another user could read it.
        write_new_private(candidate, base64.b64encode(AESGCM.generate_key(256)).decode() + "\n")
        try:
            # link() fails if another process won the race: everyone then reads the winner's key.
            os.link(candidate, path)
        except FileExistsError:
            pass
        finally:
            candidate.unlink()
    return _decode_master(path.read_text(), str(path))


def _private_keys(data_dir: Path) -> None:
    """The data directory and keys/ 0700, the key files in it 0600: made so, or tightened."""
    private_directory(data_dir)
    keys = private_directory(data_dir / "keys")
    for path in (keys / "master.key", *sorted((keys / "retired").glob("*.key"))):
        tighten_if_present(path)
    if (keys / "retired").is_dir():
        private_directory(keys / "retired")


def _derive(master: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(master)


class Keyring:
    """The current master key and the retired ones (see the module's doc)."""

    def __init__(self, master_key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._master = master_key
        self._retired = tuple(key for key in dict.fromkeys(retired) if key != master_key)

    @property
    def retired(self) -> int:
        return len(self._retired)

    def __repr__(self) -> str:  # never a key, in a log line or a traceback
        return f"Keyring(current, {len(self._retired)} retired)"

    def subkey(self, purpose: str) -> bytes:
        return _derive(self._master, purpose)

    def retired_subkeys(self, purpose: str) -> tuple[bytes, ...]:
        return tuple(_derive(key, purpose) for key in self._retired)

    def sealer(self, purpose: str) -> Sealer:
        return Sealer(self.subkey(purpose), self.retired_subkeys(purpose))

    def hasher(self, purpose: str) -> KeyedHash:
        return KeyedHash(self.subkey(purpose), self.retired_subkeys(purpose))


class Sealer:
    """AES-GCM: nonce || ciphertext+tag. The associated data binds a ciphertext to its row.
    Seals under the current key; opens under it or a retired one (the tag tells which)."""

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._aead = AESGCM(key)
        self._retired = tuple(AESGCM(k) for k in retired)

    def __repr__(self) -> str:
        return f"Sealer(current, {len(self._retired)} retired)"

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, sealed: bytes, associated_data: bytes = b"") -> bytes:
        nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, associated_data)
        except InvalidTag:
            for aead in self._retired:
                try:
                    return aead.decrypt(nonce, body, associated_data)
                except InvalidTag:
                    continue
            raise

    def reseal(self, sealed: bytes, associated_data: bytes = b"") -> bytes | None:
        """None when `sealed` is under the current key already; else its plaintext sealed under
        it (a rewrap). InvalidTag when no key opens it."""
        try:
            self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
            return None
        except InvalidTag:
            return self.seal(self.open(sealed, associated_data), associated_data)


class KeyedHash:
    """HMAC-SHA256, for looking records up by a value (ID number, phone) never stored in clear.
    `digest` is under the current key, what is stored from now on; `digests` adds the retired
    keys' ones, for lookups of rows stored before a rotation and not yet rewrapped."""

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._key = key
        self._retired = tuple(retired)

    def __repr__(self) -> str:
        return f"KeyedHash(current, {len(self._retired)} retired)"

    def digest(self, value: str) -> str:
        # The one-shot hmac.digest: OpenSSL's, without hmac.new's objects (about half the cost).
        return hmac.digest(self._key, value.encode(), "sha256").hex()

    def digests(self, value: str) -> tuple[str, ...]:
        return (self.digest(value),) + tuple(
            hmac.digest(key, value.encode(), "sha256").hex() for key in self._retired
        )

    def matches(self, value: str, stored: str) -> bool:
        """Whether `stored` is `value`'s digest under the current key or a retired one."""
        return any(hmac.compare_digest(candidate, stored) for candidate in self.digests(value))
