"""After a master key rotation: everything report_service sealed or keyed under a retired key,
sealed and keyed again under the current one, so the retired key can be destroyed.

    python -m report_service.rewrap [--database-url URL] [--data-dir DIR]

Re-seals each query's subject, each bank's sealed cards and each report's wrapped data key (the
report itself stays as it is: only its data key was sealed), and hashes the idempotency keys
stored in clear before keys were hashed (migration 0003 marks them), a batch of rows per
transaction with the rows locked, so it can run while the service does; then hashes the audit
trail again under
the current key (`python -m report_service.audit rekey`, which also drops what a report said
from entries recorded before it was left out). Reports expire within days anyway;
the subjects of queries still running and the audit trail do not. An idempotency key already
hashed under a retired key cannot be hashed again (the client's key is not kept): it is found
while that key is configured, which covers a retry's minutes many times over. A second run
changes nothing.
It reads the database and the keys report_service uses, and never creates either."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sqlalchemy import Engine, select, true, update
from sqlmodel import Session

from cardcheck.runtime.database import table_of
from cardcheck.runtime.keys import Keyring, Sealer
from cardcheck.runtime.maintenance import command_parser, run, service_store
from report_service.audit import AuditChain, Verdict
from report_service.models import BankOutcomeRow, QueryRow, ReportRow
from report_service.queries import IDEMPOTENCY_KEY

BATCH = 500


def _rewrap_column(engine: Engine, table, key_column, sealed_column, sealer: Sealer, bound_to, batch: int) -> int:
    """Re-seals `sealed_column` row by row in primary-key order; `bound_to(row)` is the
    associated data it was sealed with. Empty and NULL values (erased) are left alone."""
    changed, after = 0, None
    while True:
        with Session(engine) as session, session.begin():
            query = select(table).where(sealed_column.is_not(None)).order_by(key_column).limit(batch)
            if after is not None:
                query = query.where(key_column > after)
            # Locked: a sweep erasing a value meanwhile must not see it written back.
            rows = session.execute(query.with_for_update()).all()
            for row in rows:
                sealed = row._mapping[sealed_column.name]
                resealed = sealer.reseal(sealed, bound_to(row)) if sealed else None
                if resealed is not None:
                    session.execute(
                        update(table).where(key_column == row._mapping[key_column.name])
                        .values({sealed_column.name: resealed})
                    )
                    changed += 1
        if len(rows) < batch:
            return changed
        after = rows[-1]._mapping[key_column.name]


def _hash_idempotency_keys(engine: Engine, keyring: Keyring, batch: int) -> int:
    """Replaces each idempotency key stored in clear with its keyed hash under the current key."""
    queries = table_of(QueryRow)
    hasher = keyring.hasher(IDEMPOTENCY_KEY)
    changed = 0
    while True:
        with Session(engine) as session, session.begin():
            rows = session.execute(
                select(queries.c.query_id, queries.c.idempotency_key)
                .where(queries.c.idempotency_key_in_clear == true())
                .order_by(queries.c.query_id)
                .limit(batch)
                .with_for_update()
            ).all()
            for query_id, key in rows:
                session.execute(
                    update(queries)
                    .where(queries.c.query_id == query_id)
                    .values(
                        idempotency_key=hasher.digest(key) if key is not None else None,
                        idempotency_key_in_clear=False,
                    )
                )
            changed += len(rows)
        if len(rows) < batch:
            return changed


def rewrap(engine: Engine, keyring: Keyring, batch: int = BATCH) -> tuple[int, Verdict | None]:
    """Rows changed, and the audit trail's verdict (None when there is none)."""
    queries, outcomes, reports = table_of(QueryRow), table_of(BankOutcomeRow), table_of(ReportRow)
    changed = _rewrap_column(
        engine, queries, queries.c.query_id, queries.c.subject_sealed, keyring.sealer("subject"),
        lambda row: row.query_id.encode(), batch,
    )
    changed += _rewrap_column(
        engine, outcomes, outcomes.c.id, outcomes.c.cards_sealed, keyring.sealer("bank-outcome"),
        lambda row: f"{row.query_id}/{row.bank_code}".encode(), batch,
    )
    changed += _rewrap_column(
        engine, reports, reports.c.query_id, reports.c.wrapped_key, keyring.sealer("report-kek"),
        lambda row: row.query_id.encode(), batch,
    )
    changed += _hash_idempotency_keys(engine, keyring, batch)
    rekeyed = AuditChain.from_keyring(keyring).rekey(engine)
    return changed, None if rekeyed is None else rekeyed.verdict


def main(argv: Sequence[str] | None = None) -> int:
    args = command_parser("python -m report_service.rewrap", __doc__.split("\n\n")[0]).parse_args(argv)

    def command() -> int:
        with service_store("report_service", QueryRow.__tablename__, args) as (engine, keyring):
            changed, verdict = rewrap(engine, keyring)
        print(f"report_service: {changed} rows rewrapped under the current key")
        if verdict is not None and not verdict.ok:
            print(verdict.describe())
            return 1
        return 0

    return run("report_service", command)

if __name__ == "__main__":
    sys.exit(main())
