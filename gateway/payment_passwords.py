"""The payment password (6 digits) as it is stored and checked: a keyed hash under a server-side
secret (a pepper), computed on a small executor of its own with a bounded queue in front.

Stored as `hmac-sha256$<key id>$<salt>$<mac>`: the MAC is HMAC-SHA256 under the subkey
"payment-password" of the master key (cardcheck/runtime/keys.py) over a random 16-byte salt, the
user id and the password; the key id is a digest of that subkey, which tells which master key
(current or retired) made the hash without trying them all and says nothing about the key. The
user id binds a hash to its row (a hash copied onto another account does not verify there); the
salt keeps two accounts with the same password from storing the same value.

Why a keyed hash and no argon2. Six digits are 10^6 candidates: a memory-hard hash cannot make
that space expensive to search without making every verification expensive too. argon2-cffi's
defaults (argon2id, 64 MiB, t=3, p=4), what was stored before, cost about 0.25 s of CPU per
verification on this project's 2-core machines and still give a stolen database up in about
70 CPU-hours per account with no secret needed; OWASP's minimum (argon2id, 19 MiB, t=2, p=1)
costs about 32 ms and gives an account up in 9 CPU-hours. The keyed HMAC-SHA256 costs a few
microseconds, some 40,000 times less than the defaults (figures: `python -m bench
payment_password`). With the key kept out of the database, a dump alone cannot
test a single guess, which is what protects a 6-digit secret (banks verify PINs the same way, in
an HSM); online guessing is bounded by the lockout (gateway/users.py). Whoever holds the master
key as well holds the gateway itself, where passwords arrive in clear and sessions can be
signed: argon2 on top would only slow a search of 10^6 values by a constant, at the price of the
throughput of every GetReport. So the keyed hash alone.

Hashes stored before this scheme are plain argon2 (`$argon2id$...`): they verify as before and are
stored again under the keyed scheme at the next right password, so nobody has to reset.

Rotation. A hash made under a retired master key verifies while that key is configured and is
made again under the current key at the next right password. `python -m gateway.rewrap` cannot
do it (it would need the password). When the retired key is removed, the hashes it made can no
longer be checked: their users are asked to reset the payment password by SMS and face check
(ResetPaymentPassword; GetReport says PAYMENT_PASSWORD_LOCKED with `reset_required`), and such a
refusal is never counted as a wrong password. So keep a retired key as long as its users should
keep their password without a reset (their next GetReport moves them to the current key); the
ones who have not come back by the time it is destroyed reset theirs.

The executor. The keyed hash is made and checked on the event loop: a few microseconds, less
than a hop to a thread and back costs. A plain argon2 hash of the old scheme is verified on a
ThreadPoolExecutor of its own (by default one thread per usable core), never on the executor
that Database.run uses, so a burst of them cannot starve the database. At most `queue` wait
beyond the running ones; past that a verification is refused at once (SERVICE_BUSY, with a
RetryInfo) instead of queueing without bound. It takes its 64 MiB only while it runs, so memory
is bounded by the number of threads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from cardcheck.runtime.errors import CardCheckError, Reason
from cardcheck.runtime.keys import Keyring

T = TypeVar("T")

PEPPER_KEY = "payment-password"  # the purpose of the subkey
SCHEME = "hmac-sha256"
LEGACY_PREFIX = "$argon2"  # argon2-cffi's encoded hashes: the scheme before this one
SALT_BYTES = 16
BUSY_RETRY_AFTER = timedelta(seconds=1)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(key: bytes) -> str:
    """Names a subkey in a stored hash without saying anything about it."""
    return hmac.new(key, b"key id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Checked:
    """What verifying a password against a stored hash found."""

    right: bool
    rehash: bool = False  # right, and the hash should be made again (old scheme or retired key)
    unverifiable: bool = False  # made under a master key no longer configured: nothing can tell


class PaymentPasswordHashes:
    """The scheme itself, synchronous and without I/O: makes a hash under the current key and
    verifies one under it, a retired key, or the plain argon2 of the old scheme."""

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._key = key
        self._key_id = key_id(key)
        self._keys = {key_id(k): k for k in (*retired, key)}
        self._legacy = PasswordHasher()  # argon2-cffi's defaults, as the old scheme stored

    @classmethod
    def from_keyring(cls, keyring: Keyring) -> PaymentPasswordHashes:
        return cls(keyring.subkey(PEPPER_KEY), keyring.retired_subkeys(PEPPER_KEY))

    @staticmethod
    def _mac(key: bytes, salt: bytes, user_id: str, password: str) -> bytes:
        return hmac.digest(key, salt + user_id.encode() + b"\0" + password.encode(), "sha256")

    def hash(self, user_id: str, password: str) -> str:
        salt = secrets.token_bytes(SALT_BYTES)
        mac = self._mac(self._key, salt, user_id, password)
        return f"{SCHEME}${self._key_id}${_b64(salt)}${_b64(mac)}"

    def verify(self, user_id: str, stored: str, password: str) -> Checked:
        if stored.startswith(LEGACY_PREFIX):
            try:
                self._legacy.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return Checked(False)
            return Checked(True, rehash=True)
        scheme, _, rest = stored.partition("$")
        parts = rest.split("$")
        if scheme != SCHEME or len(parts) != 3:
            return Checked(False)
        stored_key_id, salt, mac = parts
        key = self._keys.get(stored_key_id)
        if key is None:
            return Checked(False, unverifiable=True)
        try:
            expected = _unb64(mac)
            right = hmac.compare_digest(self._mac(key, _unb64(salt), user_id, password), expected)
        except ValueError:  # not base64
            return Checked(False)
        return Checked(right, rehash=right and stored_key_id != self._key_id)


class BoundedExecutor:
    """A thread pool of `workers` threads with at most `queue` calls waiting: beyond that a call
    is refused SERVICE_BUSY at once. A call counts until its thread is done with it, even when
    its caller gave up (a cancelled RPC), so the bound holds for the work itself."""

    def __init__(self, workers: int, queue: int, *, name: str = "payment-password") -> None:
        if workers < 1 or queue < 0:
            raise ValueError("workers must be at least 1 and queue at least 0")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._capacity = workers + queue
        self._taken = 0

    @property
    def taken(self) -> int:
        """Calls running or waiting."""
        return self._taken

    def _release(self) -> None:
        self._taken -= 1

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        if self._taken >= self._capacity:
            raise CardCheckError(
                Reason.SERVICE_BUSY, "too many payment password checks at once", retry_after=BUSY_RETRY_AFTER
            )
        loop = asyncio.get_running_loop()
        future = self._pool.submit(work, *args)
        self._taken += 1

        def done(_future: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is counting
                loop.call_soon_threadsafe(self._release)

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PaymentPasswords:
    """The scheme on its bounded executor: what Users calls."""

    def __init__(self, keyring: Keyring, *, workers: int | None = None, queue: int = 16) -> None:
        self.hashes = PaymentPasswordHashes.from_keyring(keyring)
        self.executor = BoundedExecutor(workers or usable_cores(), queue)

    async def hash(self, user_id: str, password: str) -> str:
        return self.hashes.hash(user_id, password)

    async def verify(self, user_id: str, stored: str, password: str) -> Checked:
        if stored.startswith(LEGACY_PREFIX):  # argon2: a quarter of a second of CPU
            return await self.executor.run(self.hashes.verify, user_id, stored, password)
        return self.hashes.verify(user_id, stored, password)

    def close(self) -> None:
        self.executor.shutdown()
