"""The audit trail: every event of a query's life appended to rs_audit, hash-chained.

Each entry's hash is SHA-256 over the previous entry's hash (32 bytes; zeros before the first)
followed by the entry's canonical form: compact JSON with sorted keys of its seq, instant (UTC,
microseconds), event, query_id, user_id and details. Changing an entry breaks its own hash;
deleting one leaves a gap in seq and breaks the next entry's link; deleting the last ones no
longer matches rs_audit_head, the one row that names the newest entry. Appends lock that row
(SELECT ... FOR UPDATE on PostgreSQL; on SQLite every write transaction is exclusive), as the
last step of the transaction that records the event, so the chain never forks and an event is
audited exactly when it is committed.

No personal data in clear: user ids are the gateway's opaque ids; details hold bank codes,
outcome kinds, counts and the consent version, never a name, ID or phone number or card digits.

    python -m report_service.audit verify [--database-url URL] [--data-dir DIR]

prints OK with the number of entries, or the first broken entry and exits 1 (2 when there is
no audit trail to verify). Without options it reads the database report_service uses
(CARDCHECK_DATABASE_URL, else the SQLite file under CARDCHECK_DATA_DIR)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, insert, inspect, select, update
from sqlmodel import Session

from cardcheck.runtime.clock import as_utc
from report_service.models import AuditHeadRow, AuditRow

GENESIS = "0" * 64

QUERY_ACCEPTED = "query.accepted"
BANKS_ASKED = "banks.asked"
BANK_OUTCOME = "bank.outcome"
REPORT_GENERATED = "report.generated"
QUERY_FAILED = "query.failed"
REPORT_VIEWED = "report.viewed"
REPORT_DELETED = "report.deleted"

_LONG_DIGITS = re.compile(r"\d{11,}")  # phone numbers, ID numbers, card numbers


@dataclass(frozen=True)
class AuditEvent:
    event: str
    query_id: str | None = None
    user_id: str | None = None
    details: Mapping[str, object] = field(default_factory=dict)


def _instant(at: datetime) -> str:
    return as_utc(at).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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


def entry_hash(prev_hash: str, entry: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + entry).hexdigest()


def _check_no_personal_data(details: Mapping[str, object]) -> None:
    text = _json(details)
    if _LONG_DIGITS.search(text):
        raise ValueError("audit details must not carry long digit strings (phone, ID or card numbers)")


def append(session: Session, events: Sequence[AuditEvent], at: datetime) -> None:
    """Appends `events` in order to the chain, inside the caller's transaction; call it as the
    last step of that transaction so the head row stays locked as briefly as possible."""
    if not events:
        return
    head = AuditHeadRow.__table__
    seq, prev = session.execute(select(head.c.seq, head.c.hash).where(head.c.id == 1).with_for_update()).one()
    rows = []
    for event in events:
        _check_no_personal_data(event.details)
        seq += 1
        details = dict(event.details)
        digest = entry_hash(prev, canonical(seq, at, event.event, event.query_id, event.user_id, details))
        rows.append(
            {
                "seq": seq,
                "recorded_at": at,
                "event": event.event,
                "query_id": event.query_id,
                "user_id": event.user_id,
                "details": _json(details),
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    session.execute(insert(AuditRow.__table__), rows)
    session.execute(update(head).where(head.c.id == 1).values(seq=seq, hash=prev))


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    head_hash: str
    broken_seq: int | None = None
    problem: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"audit trail OK: {self.entries} entries, head {self.head_hash}"
        return f"audit trail BROKEN at entry {self.broken_seq}: {self.problem}"


def verify_rows(rows: Iterable[Sequence], head: tuple[int, str]) -> Verdict:
    """Walks the entries in seq order; the first that does not hold names the break."""
    expected_seq, prev = 1, GENESIS
    count = 0
    for seq, recorded_at, event, query_id, user_id, details_text, prev_hash, stored_hash in rows:
        if seq != expected_seq:
            return Verdict(False, count, prev, expected_seq, f"missing (the next entry present is {seq})")
        if prev_hash != prev:
            return Verdict(False, count, prev, seq, "does not link to the entry before it")
        try:
            details = json.loads(details_text)
        except (TypeError, ValueError):
            return Verdict(False, count, prev, seq, "its details are not the JSON that was recorded")
        recomputed = entry_hash(prev, canonical(seq, recorded_at, event, query_id, user_id, details))
        if recomputed != stored_hash:
            return Verdict(False, count, prev, seq, f"changed after it was recorded ({event})")
        prev = stored_hash
        expected_seq += 1
        count += 1
    head_seq, head_hash = head
    if head_seq != count or head_hash != prev:
        if head_seq > count:
            return Verdict(False, count, prev, count + 1, f"missing (the head names entry {head_seq})")
        return Verdict(False, count, prev, head_seq, "the head row does not name the last entry")
    return Verdict(True, count, prev)


def verify(connection: Connection) -> Verdict:
    """Verifies the entries up to the one the head names. Entries appended meanwhile come after
    it (the head and its entries are committed together), so no snapshot of the whole table
    is needed and writers are never held up."""
    table = AuditRow.__table__
    head_table = AuditHeadRow.__table__
    head = connection.execute(select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)).first()
    if head is None:
        return Verdict(False, 0, GENESIS, 1, "the head row is missing")
    rows = connection.execution_options(yield_per=2000).execute(
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
        .where(table.c.seq <= head.seq)
        .order_by(table.c.seq)
    )
    return verify_rows(rows, (head.seq, head.hash))


def verify_engine(engine: Engine) -> Verdict | None:
    """None when the database has no audit trail (report_service never migrated it)."""
    if not inspect(engine).has_table(AuditHeadRow.__tablename__):
        return None
    with engine.connect() as connection:
        return verify(connection)


def _reader(database_url: str | None, data_dir: Path) -> Engine | None:
    """An engine that only reads: the SQLite file opened read-only (no lock held on writers)."""
    if database_url:
        return create_engine(database_url)
    path = data_dir / "report_service.db"
    if not path.is_file():
        return None
    return create_engine(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true")


def main(argv: Sequence[str] | None = None) -> int:
    from cardcheck.runtime.settings import Settings, SettingsError

    parser = argparse.ArgumentParser(prog="python -m report_service.audit", description="The audit trail.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the hash chain; exit 1 at the first broken entry")
    check.add_argument("--database-url", help="default: CARDCHECK_DATABASE_URL, else the SQLite file")
    check.add_argument("--data-dir", type=Path, help="default: CARDCHECK_DATA_DIR")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"report_service.audit: {error}", file=sys.stderr)
        return 2
    engine = _reader(args.database_url or settings.database_url, args.data_dir or settings.data_dir)
    if engine is None:
        print(f"no report_service database in {args.data_dir or settings.data_dir}", file=sys.stderr)
        return 2
    try:
        verdict = verify_engine(engine)
    finally:
        engine.dispose()
    if verdict is None:
        print("no audit trail in that database", file=sys.stderr)
        return 2
    print(verdict.describe())
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
