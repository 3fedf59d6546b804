"""The audit trail: every event of a query's life appended to rs_audit, hash-chained.

Each entry's hash is HMAC-SHA256, under a key derived from the master key ("audit-chain"),
over the previous entry's hash (32 bytes; zeros before the first) followed by the entry's
canonical form: compact JSON with sorted keys of its seq, instant (UTC, microseconds), event,
query_id, user_id and details. The key is never in the database, so whoever can write to it
still cannot make a changed entry hash right. Changing an entry breaks its own hash; deleting
one leaves a gap in seq and breaks the next entry's link; deleting the last ones no longer
matches rs_audit_head, the one row that names the newest entry. Deleting the last ones and
moving the head back with them is what a key alone cannot show: report_service logs the head
as it moves ("audit head N:H"), so logs kept elsewhere hold earlier heads, and
`verify --head N:H` checks that entry N is still the one they named. Appends lock that row
(on SQLite every write transaction is exclusive), as the last step of the transaction that
records the event, so the chain never forks and an event is audited exactly when it is
committed: an UPDATE that moves it on from the head this process's last append left, when it
still names that one (two statements with the entries' insert), else SELECT ... FOR UPDATE and
the entries made after what it names (three).

The events: query.accepted (the banks, the consent version), banks.asked (the banks of a pass and
its number), bank.outcomes (each batch of outcomes recorded together, in one transaction: every
bank of it with the kind of its outcome, as [bank, kind] pairs in the order recorded),
report.generated or query.failed (the banks unanswered), report.viewed and report.deleted.
Trails recorded before outcomes were batched hold a bank.outcome entry ({"bank", "kind"}) per
bank instead; they verify and rekey as any other entry.

No personal data in clear: user ids are the gateway's opaque ids; details hold bank codes,
outcome kinds, pass numbers and the consent version, never a name, ID or phone number or card
digits. Nor anything a report says (how many cards a bank holds, which banks answered at its
generation): the trail outlives every report, which is deleted after its days, and what a report
said must go with it. The trail records what the service did (a bank asked, the kind of its
outcome, a report generated, viewed, deleted), never what it found. Entries recorded before
carry card counts and the report's answered/unavailable banks; `rekey` drops them (below).

    python -m report_service.audit verify [--head SEQ:HASH ...] [--database-url URL] [--data-dir DIR]

prints OK with the number of entries and the head, or the first broken entry and exits 1 (2
when there is no audit trail or no master key). It reads the database and the master key
report_service uses (CARDCHECK_DATABASE_URL, else the SQLite file under CARDCHECK_DATA_DIR;
CARDCHECK_MASTER_KEY, else the key file there).

    python -m report_service.audit rekey [--database-url URL] [--data-dir DIR]

once, for a trail begun before entries were keyed, after a master key rotation (entries under
a retired key, CARDCHECK_RETIRED_MASTER_KEYS), or begun before report contents were left out of
entries: checks every entry as it was recorded (plain SHA-256, then keyed ones) and, only if all
hold, drops what a report said from the entries that hold it (REPORT_CONTENTS) and hashes the
whole chain again under the current key, in one transaction that holds the head
(`python -m report_service.rewrap` runs it too). Exits 1, changing nothing, at the first broken
entry. It says how many entries were plain and how many held report contents: a trail that once
verified keyed and no longer does is evidence of tampering, never something to rekey (it would
accept a chain rewritten in plain). Rehashing gives entries new hashes, so heads recorded before
a rekey that changed anything no longer check: the new head it prints is the one to record.
`verify` says how many entries still hold report contents."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, bindparam, insert, inspect, select, update
from sqlmodel import Session

from cardcheck.runtime.clock import as_utc
from cardcheck.runtime.database import rowcount, table_of
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.maintenance import Refused, add_location_options, run, service_store
from cardcheck.runtime.statements import Statement
from report_service.models import AuditHeadRow, AuditRow

GENESIS = "0" * 64
_READS_AFTER_A_MISS = 16  # appends that read the head first once guessing it went wrong
KEY_PURPOSE = "audit-chain"

QUERY_ACCEPTED = "query.accepted"
BANKS_ASKED = "banks.asked"
BANK_OUTCOMES = "bank.outcomes"
BANK_OUTCOME = "bank.outcome"  # one bank's, in trails recorded before outcomes were batched
REPORT_GENERATED = "report.generated"
QUERY_FAILED = "query.failed"
REPORT_VIEWED = "report.viewed"
REPORT_DELETED = "report.deleted"

_LONG_DIGITS = re.compile(r"\d{11,}")  # phone numbers, ID numbers, card numbers

# What a report says, as entries recorded before it was left out carry it: a bank's card count
# (bank.outcome) and the banks answered and unavailable when the report was generated
# (report.generated). Refused in new entries, dropped from old ones by `rekey`.
REPORT_CONTENTS = frozenset(
    {"cards", "debit_count", "credit_count", "summary", "banks_answered", "unavailable", "unavailable_banks"}
)


@dataclass(frozen=True)
class AuditEvent:
    event: str
    query_id: str | None = None
    user_id: str | None = None
    details: Mapping[str, object] = field(default_factory=dict)
    # What the observers are told beside the event and the entry never holds (a READY query's
    # submission instant, for the time-to-ready metric): neither hashed nor stored.
    facts: Mapping[str, object] = field(default_factory=dict, compare=False)


def _instant(at: datetime) -> str:
    return as_utc(at).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# json.dumps with these options makes an encoder at each call: one, made once.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json(value: object) -> str:
    return _ENCODER.encode(value)


def canonical(
    seq: int,
    at: datetime,
    event: str,
    query_id: str | None,
    user_id: str | None,
    details: Mapping[str, object],
) -> bytes:
    return _json(
        {
            "seq": seq,
            "at": _instant(at),
            "event": event,
            "query_id": query_id,
            "user_id": user_id,
            "details": details,
        }
    ).encode("utf-8")


def _canonical_of(
    seq: int, instant: str, event: str, query_id: str | None, user_id: str | None, details_text: str
) -> bytes:
    """`canonical`, byte for byte, from the instant and the details as _json wrote them: an
    append writes both once for all its entries (keys in sorted order, as _json sorts them)."""
    return _canonical_from(seq, _json(instant), _json(event), _json(query_id), _json(user_id), details_text)


def _canonical_from(seq: int, instant: str, event: str, query_id: str, user_id: str, details_text: str) -> bytes:
    """`canonical` from each part as _json writes it."""
    return (
        f'{{"at":{instant},"details":{details_text},"event":{event},'
        f'"query_id":{query_id},"seq":{seq},"user_id":{user_id}}}'
    ).encode()


def plain_hash(prev_hash: str, entry: bytes) -> str:
    """How entries were hashed before the chain was keyed; only `rekey` still accepts it."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + entry).hexdigest()


def _check_no_personal_data(details: Mapping[str, object], text: str | None = None) -> None:
    """`text`: the details as _json writes them, when the caller has them already."""
    if _LONG_DIGITS.search(_json(details) if text is None else text):
        raise ValueError("audit details must not carry long digit strings (phone, ID or card numbers)")
    contents = sorted(REPORT_CONTENTS.intersection(details))
    if contents:
        raise ValueError(f"audit details must not carry what a report says ({', '.join(contents)})")


def without_report_contents(details: Mapping[str, object]) -> dict[str, object]:
    """An entry's details as they are recorded now: what a report said left out."""
    return {name: value for name, value in details.items() if name not in REPORT_CONTENTS}


class AuditChain:
    """Appends to the chain under the chain's current key and verifies it. After a master key
    rotation, entries under a retired key still verify (replicas not yet restarted append under
    it for a while); `rekey` then hashes the chain again under the current key."""

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._key = key
        self._retired = tuple(retired)
        # The key's inner and outer pads hashed once: each entry copies them (hmac.new per
        # entry would hash the key again).
        self._keyed_mac = hmac.new(key, digestmod=hashlib.sha256)
        # The head as this chain's last append left it: the next one moves the head row on
        # from there without reading it first, while nobody else appended (_append).
        self._head: tuple[int, str] | None = None
        self._misses_left = 0
        # Told of each event appended, inside its transaction (report_service/metrics.py).
        self.observers: list[Callable[[Session | Connection, AuditEvent, datetime], None]] = []

    def __repr__(self) -> str:  # never the chain's key
        return f"AuditChain(current, {len(self._retired)} retired)"

    @classmethod
    def from_keyring(cls, keyring: Keyring) -> AuditChain:
        return cls(keyring.subkey(KEY_PURPOSE), keyring.retired_subkeys(KEY_PURPOSE))

    def entry_hash(self, prev_hash: str, entry: bytes) -> str:
        mac = self._keyed_mac.copy()
        mac.update(bytes.fromhex(prev_hash))
        mac.update(entry)
        return mac.hexdigest()

    def _keyed(self, prev_hash: str, entry: bytes, stored: str) -> bool:
        """Whether `stored` is the entry's hash under the current key or a retired one."""
        message = bytes.fromhex(prev_hash) + entry
        return any(
            hmac.compare_digest(hmac.new(key, message, hashlib.sha256).hexdigest(), stored)
            for key in (self._key, *self._retired)
        )

    def append(self, session: Session | Connection, events: Sequence[AuditEvent], at: datetime) -> None:
        """Appends `events` in order to the chain, inside the caller's transaction; call it as
        the last step of that transaction so the head row stays locked as briefly as possible."""
        if events:
            head = self._head if self._misses_left == 0 else None
            if self._misses_left:
                self._misses_left -= 1
            moved = _append(session, events, at, self.entry_hash, head)
            if head is not None and moved is not None and moved[0] != head[0] + len(events):
                # Another writer appended since this one's last: with several replicas
                # appending, the head is read first for a while rather than guessed.
                self._misses_left = _READS_AFTER_A_MISS
            # Kept even if the transaction rolls back: the head row then names another, and
            # the next append reads it.
            self._head = moved
            for observe in self.observers:
                for event in events:
                    observe(session, event, at)

    def verify(self, connection: Connection, anchors: Mapping[int, str] | None = None) -> Verdict:
        """`anchors`: heads recorded earlier (seq → hash, as report_service logs them), which
        must still be entries of the chain: deleting the newest entries and moving the head back
        with them is what the key alone cannot show."""
        return _verify(connection, self._keyed, anchors or {})

    def verify_engine(self, engine: Engine, anchors: Mapping[int, str] | None = None) -> Verdict | None:
        """None when the database has no audit trail (report_service never migrated it)."""
        if not inspect(engine).has_table(AuditHeadRow.__tablename__):
            return None
        with engine.connect() as connection:
            return self.verify(connection, anchors)

    def rekey(self, engine: Engine) -> Rekeyed | None:
        """Hashes a trail begun before entries were keyed, with entries under a retired key or
        with report contents in them again under the current key, report contents dropped (see
        the module's doc); a trail under it and without them is left as it is. The verdict is
        on the trail as recorded: when it is broken nothing is changed. None when there is no
        audit trail."""
        if not inspect(engine).has_table(AuditHeadRow.__tablename__):
            return None
        with Session(engine) as session, session.begin():
            head = table_of(AuditHeadRow)
            head_row = session.execute(
                select(head.c.seq, head.c.hash).where(head.c.id == 1).with_for_update()
            ).first()
            if head_row is None:
                return Rekeyed(Verdict(False, 0, GENESIS, 1, "the head row is missing"))
            entries = list(session.execute(_entries_up_to(head_row.seq)))
            plain: list[int] = []
            verdict = verify_rows(entries, tuple(head_row), self._recorded_hash(plain))
            if not verdict.ok:
                return Rekeyed(verdict, len(plain))
            table = table_of(AuditRow)
            if verdict.with_report_contents and session.get_bind().dialect.name == "sqlite":
                # The details overwritten are zeroed rather than left in free pages (as the sweep does).
                session.connection().exec_driver_sql("PRAGMA secure_delete = ON")
            prev = GENESIS
            for seq, recorded_at, event, query_id, user_id, details_text, prev_hash, stored_hash in entries:
                recorded = json.loads(details_text)
                details = without_report_contents(recorded)
                digest = self.entry_hash(prev, canonical(seq, recorded_at, event, query_id, user_id, details))
                values: dict[str, str] = {}
                if details != recorded:
                    values["details"] = _json(details)
                if (prev_hash, stored_hash) != (prev, digest):
                    values.update(prev_hash=prev, hash=digest)
                if values:
                    session.execute(update(table).where(table.c.seq == seq).values(values))
                prev = digest
            session.execute(update(head).where(head.c.id == 1).values(hash=prev))
            return Rekeyed(Verdict(True, verdict.entries, prev), len(plain), verdict.with_report_contents)

    def _recorded_hash(self, plain: list[int]) -> Callable[[str, bytes, str], bool]:
        """Whether an entry's stored hash is what it was recorded with: plain SHA-256 while no
        keyed entry has come yet, keyed from the first keyed one on (never plain again). Each
        plain one is counted in `plain`."""
        keyed_seen = False

        def holds(prev_hash: str, entry: bytes, stored: str) -> bool:
            nonlocal keyed_seen
            if self._keyed(prev_hash, entry, stored):
                keyed_seen = True
                return True
            if keyed_seen or not hmac.compare_digest(plain_hash(prev_hash, entry), stored):
                return False
            plain.append(1)
            return True

        return holds


# Built once: an append runs with every recorded event, and building the statements again each
# time cost more than running them.
_HEAD = table_of(AuditHeadRow)
_READ_HEAD = Statement(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update())
_MOVE_HEAD = Statement(
    update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
_MOVE_HEAD_FROM = Statement(
    _MOVE_HEAD.statement.where(_HEAD.c.seq == bindparam("old_seq"), _HEAD.c.hash == bindparam("old_hash"))
)
_INSERT_ENTRIES = Statement(insert(table_of(AuditRow)))


def _append(
    session: Session | Connection,
    events: Sequence[AuditEvent],
    at: datetime,
    entry_hash: Callable[[str, bytes], str],
    head: tuple[int, str] | None = None,
) -> tuple[int, str] | None:
    """Appends `events` after the head. `head`: the head as this process last left it; when the
    head row still names it, that row is moved on and the entries inserted, without a read
    first. Otherwise (another writer appended since) the row is read, locked, and the entries
    made after what it names. Returns the new head, None when there was nothing to append."""
    if not events:
        return None
    # Core statements on the transaction's connection: the session's own execute adds its ORM
    # dispatch to each of them.
    connection = session if isinstance(session, Connection) else session.connection()
    if head is not None:
        rows, moved = _entries(events, head, at, entry_hash)
        # Compare-and-set: the UPDATE locks the row as SELECT ... FOR UPDATE would, and moves it
        # only from the head the entries were made after (PostgreSQL checks the row again once
        # a concurrent writer's lock is gone).
        if rowcount(_MOVE_HEAD_FROM.run(connection, _moved(moved, head))) == 1:
            _INSERT_ENTRIES.run(connection, rows)
            return moved
    read = _READ_HEAD.run(connection).one()
    rows, moved = _entries(events, (read[0], read[1]), at, entry_hash)
    _INSERT_ENTRIES.run(connection, rows)
    _MOVE_HEAD.run(connection, _moved(moved))
    return moved


def _moved(to: tuple[int, str], since: tuple[int, str] | None = None) -> dict[str, object]:
    values: dict[str, object] = {"new_seq": to[0], "new_hash": to[1]}
    if since is not None:
        values.update(old_seq=since[0], old_hash=since[1])
    return values


def _entries(
    events: Sequence[AuditEvent], head: tuple[int, str], at: datetime, entry_hash: Callable[[str, bytes], str]
) -> tuple[list[dict[str, object]], tuple[int, str]]:
    """The rows of `events` chained after `head`, and the head they make."""
    seq, prev = head
    instant = _json(_instant(at))
    # An append's entries mostly share their event, query and user: each written once.
    written: dict[str | None, str] = {}

    def text_of(value: str | None) -> str:
        text = written.get(value)
        if text is None:
            text = written[value] = _json(value)
        return text

    rows = []
    for event in events:
        details = dict(event.details)
        details_text = _json(details)
        _check_no_personal_data(details, details_text)
        seq += 1
        entry = _canonical_from(
            seq, instant, text_of(event.event), text_of(event.query_id), text_of(event.user_id), details_text
        )
        digest = entry_hash(prev, entry)
        rows.append(
            {
                "seq": seq,
                "recorded_at": at,
                "event": event.event,
                "query_id": event.query_id,
                "user_id": event.user_id,
                "details": details_text,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    return rows, (seq, prev)


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    head_hash: str
    broken_seq: int | None = None
    problem: str = ""
    with_report_contents: int = 0  # entries recorded before report contents were left out

    def describe(self) -> str:
        if self.ok:
            described = f"audit trail OK: {self.entries} entries, head {self.head_hash}"
            if self.with_report_contents:
                described += (
                    f" ({self.with_report_contents} still hold what a report said:"
                    " `cardcheck audit rekey` drops it)"
                )
            return described
        return f"audit trail BROKEN at entry {self.broken_seq}: {self.problem}"


@dataclass(frozen=True)
class Rekeyed:
    """What `rekey` found (the verdict on the trail as recorded) and, when it holds, did."""

    verdict: Verdict
    plain: int = 0  # entries hashed plain, before the chain was keyed
    redacted: int = 0  # entries whose report contents were dropped


def verify_rows(
    rows: Iterable[Sequence[Any]],
    head: tuple[int, str],
    holds: Callable[[str, bytes, str], bool],
    anchors: Mapping[int, str] | None = None,
) -> Verdict:
    """Walks the entries in seq order; the first that does not hold names the break.
    `holds(prev_hash, canonical_entry, stored_hash)` checks one entry's hash. `anchors`: heads
    recorded earlier (seq → hash), which must still be entries of the chain."""
    anchors = anchors or {}
    expected_seq, prev = 1, GENESIS
    count = contents = 0
    for seq, recorded_at, event, query_id, user_id, details_text, prev_hash, stored_hash in rows:
        if seq != expected_seq:
            return Verdict(False, count, prev, expected_seq, f"missing (the next entry present is {seq})")
        if prev_hash != prev:
            return Verdict(False, count, prev, seq, "does not link to the entry before it")
        try:
            details = json.loads(details_text)
        except (TypeError, ValueError):
            return Verdict(False, count, prev, seq, "its details are not the JSON that was recorded")
        if not holds(prev, canonical(seq, recorded_at, event, query_id, user_id, details), stored_hash):
            return Verdict(False, count, prev, seq, f"changed after it was recorded ({event})")
        if isinstance(details, dict) and not REPORT_CONTENTS.isdisjoint(details):
            contents += 1
        if seq in anchors and anchors[seq] != stored_hash:
            return Verdict(False, count, prev, seq, "not the entry a head recorded earlier named")
        prev = stored_hash
        expected_seq += 1
        count += 1
    head_seq, head_hash = head
    if head_seq != count or head_hash != prev:
        if head_seq > count:
            return Verdict(False, count, prev, count + 1, f"missing (the head names entry {head_seq})")
        return Verdict(False, count, prev, head_seq, "the head row does not name the last entry")
    if anchors and max(anchors) > count:
        return Verdict(False, count, prev, count + 1, f"missing (a head recorded earlier named entry {max(anchors)})")
    return Verdict(True, count, prev, with_report_contents=contents)


def _entries_up_to(seq: int) -> Select[*tuple[Any, ...]]:
    table = table_of(AuditRow)
    return (
        select(
            table.c.seq,
            table.c.recorded_at,
            table.c.event,
            table.c.query_id,
            table.c.user_id,
            table.c.details,
            table.c.prev_hash,
            table.c.hash,
        )
        .where(table.c.seq <= seq)
        .order_by(table.c.seq)
    )


def read_head(connection: Connection) -> tuple[int, str] | None:
    """The newest entry's seq and hash, as the head row names them."""
    head_table = table_of(AuditHeadRow)
    row = connection.execute(select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)).first()
    return None if row is None else (row.seq, row.hash)


def _verify(connection: Connection, holds: Callable[[str, bytes, str], bool], anchors: Mapping[int, str]) -> Verdict:
    """Verifies the entries up to the one the head names. Entries appended meanwhile come after
    it (the head and its entries are committed together), so no snapshot of the whole table
    is needed and writers are never held up."""
    head = read_head(connection)
    if head is None:
        return Verdict(False, 0, GENESIS, 1, "the head row is missing")
    rows = connection.execution_options(yield_per=2000).execute(_entries_up_to(head[0]))
    return verify_rows(rows, head, holds, anchors)


def _anchor(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not (seq.isdigit() and int(seq) > 0 and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise argparse.ArgumentTypeError(f"{text!r} is not SEQ:HASH (an entry number and 64 hex digits)")
    return int(seq), digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m report_service.audit", description="The audit trail.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("verify", "check the hash chain; exit 1 at the first broken entry"),
        ("rekey", "once, for a trail begun before entries were keyed: hash it again under the key"),
    ):
        subcommand = commands.add_parser(name, help=help_text)
        add_location_options(subcommand)
        if name == "verify":
            subcommand.add_argument(
                "--head", dest="anchors", action="append", default=[], type=_anchor, metavar="SEQ:HASH",
                help="a head recorded earlier (report_service logs it): entry SEQ must still have HASH",
            )
    args = parser.parse_args(argv)

    def command() -> int:
        verifying = args.command == "verify"
        with service_store("report_service", AuditHeadRow.__tablename__, args, read_only=verifying) as (
            engine, keyring
        ):
            chain = AuditChain.from_keyring(keyring)
            if verifying:
                verdict, rekeyed = chain.verify_engine(engine, dict(args.anchors)), None
            else:
                rekeyed = chain.rekey(engine)
                verdict = rekeyed.verdict if rekeyed is not None else None
        if verdict is None:  # service_store refuses a database without the trail's tables first
            raise Refused("no audit trail in that database")
        if rekeyed is not None and verdict.ok:
            # A trail that verified as keyed before and now holds plain entries was rewritten by
            # someone without the key: this count is for the operator to compare with what they expect.
            print(
                f"audit trail keyed: {verdict.entries} entries ({rekeyed.plain} were plain),"
                f" {rekeyed.redacted} cleared of what a report said, head {verdict.head_hash}"
            )
        else:
            print(verdict.describe())
        return 0 if verdict.ok else 1

    return run("report_service", command)


if __name__ == "__main__":
    sys.exit(main())
