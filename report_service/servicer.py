"""cardcheck.v1.ReportService over gRPC: protobuf in and out, the rules in QueryStore."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from opentelemetry import propagate

from cardcheck.runtime.changes import Channel
from cardcheck.runtime.errors import handles_errors
from cardcheck.runtime.waiting import wait_for_event
from cardcheck.v1 import common_pb2, report_service_pb2, report_service_pb2_grpc
from report_service.models import QueryStatus
from report_service.queries import Query, QueryStore, Subject
from report_service.reports import BankOutcome, MaskedCard, Report, bank_display_name
from report_service.worker import QueryWorker

# Watchers wake on the query's change notification (cardcheck.runtime.changes), from this
# replica's worker or, through NOTIFY on PostgreSQL, another's; they read again this often in
# case a notification was lost.
WATCH_SAFETY_POLL_S = 5.0

Progress = report_service_pb2.ReportServiceWatchQueryResponse

_STATUS = {
    QueryStatus.PENDING: common_pb2.QUERY_STATUS_PENDING,
    QueryStatus.READY: common_pb2.QUERY_STATUS_READY,
    QueryStatus.FAILED: common_pb2.QUERY_STATUS_FAILED,
    QueryStatus.EXPIRED: common_pb2.QUERY_STATUS_EXPIRED,
}
_OUTCOME_KIND = {
    name.removeprefix("BANK_OUTCOME_KIND_"): number for name, number in common_pb2.BankOutcomeKind.items()
}
_CARD_TYPE = {"DEBIT": common_pb2.CARD_TYPE_DEBIT, "CREDIT": common_pb2.CARD_TYPE_CREDIT}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(instant: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Timestamp.FromDatetime's value (a naive instant taken as UTC), without its calendar
    round trip: every watcher's message carries four of them."""
    if instant is None:
        return None
    since = (instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


def query_pb(query: Query) -> common_pb2.Query:
    return common_pb2.Query(
        query_id=query.query_id,
        status=_STATUS[query.status],
        bank_codes=list(query.bank_codes),
        submitted_at=_ts(query.submitted_at),
        ready_by=_ts(query.ready_by),
        ready_at=_ts(query.ready_at),
        expires_at=_ts(query.expires_at),
        banks_answered=query.banks_answered,
        banks_total=query.banks_total,
        agreement_version=query.agreement_version,
    )


def _card_pb(card: MaskedCard) -> common_pb2.MaskedCard:
    return common_pb2.MaskedCard(
        bank_code=card.bank_code,
        bank_name=card.bank_name,
        card_type=_CARD_TYPE.get(card.card_type, common_pb2.CARD_TYPE_UNSPECIFIED),
        first4=card.first4,
        last4=card.last4,
    )


def progress_pb(outcome: BankOutcome) -> report_service_pb2.BankProgress:
    """How far the bank got, without its cards: WatchQuery carries no card at all."""
    return report_service_pb2.BankProgress(
        bank_code=outcome.bank_code,
        kind=_OUTCOME_KIND[outcome.kind],
        detail=outcome.detail,
    )


def report_pb(report: Report) -> common_pb2.Report:
    content = report.content
    return common_pb2.Report(
        query_id=report.query_id,
        generated_at=_ts(report.generated_at),
        expires_at=_ts(report.expires_at),
        summary=[
            common_pb2.BankSummary(
                bank_code=row.bank_code,
                bank_name=bank_display_name(row.bank_code),
                debit_count=row.debit_count,
                credit_count=row.credit_count,
            )
            for row in content.summary
        ],
        cards=[_card_pb(card) for card in content.cards],
        unavailable_banks=[
            common_pb2.UnavailableBank(bank_code=row.bank_code, reason=row.reason)
            for row in content.unavailable_banks
        ],
        notice=content.notice,
    )


class ReportServiceServicer(report_service_pb2_grpc.ReportServiceServicer):
    def __init__(self, store: QueryStore, worker: QueryWorker, changes: Channel) -> None:
        self._store = store
        self._worker = worker
        self._changes = changes

    @handles_errors
    async def CreateQuery(self, request, context):
        trace_context: dict[str, str] = {}
        propagate.inject(trace_context)  # the execution joins the trace of this request
        subject = Subject(request.subject.name, request.subject.id_number, request.subject.phone)
        # With room to spare, this replica's worker takes the new query in the same transaction
        # that accepts it, and starts asking the banks as soon as it is committed.
        worker = self._worker.owner if self._worker.has_room() else None
        query, created = await self._store.create(
            request.user_id,
            subject,
            list(request.bank_codes),
            request.agreement_version,
            request.idempotency_key,
            trace_context,
            lease_to=worker,
            lease=self._worker.lease,
            work_changes=self._worker.work_changes,
        )
        if created and worker:
            self._worker.run_accepted(query, subject, trace_context)
        return report_service_pb2.CreateQueryResponse(query=query_pb(query))

    @handles_errors
    async def GetQuery(self, request, context):
        query = await self._store.get(request.user_id, request.query_id)
        return report_service_pb2.GetQueryResponse(query=query_pb(query))

    @handles_errors
    async def ListQueries(self, request, context):
        queries = await self._store.list(request.user_id) if request.user_id else []
        return report_service_pb2.ReportServiceListQueriesResponse(queries=[query_pb(q) for q in queries])

    @handles_errors
    async def GetReport(self, request, context):
        report = await self._store.report(request.user_id, request.query_id)
        return report_service_pb2.ReportServiceGetReportResponse(report=report_pb(report))

    @handles_errors
    async def WatchQuery(self, request, context):
        """The state so far first (a late joiner learns every outcome recorded), then a message
        for each change: the outcomes it recorded or changed (a failed bank answering on a
        later pass), or none for another change, until the query leaves PENDING. Only what is
        new: the watcher keeps the state. Woken by the query's change notification, whichever
        replica's worker recorded it; idle, a watcher costs nothing but its slow safety poll."""
        changed = self._changes.current(request.query_id)
        query, outcomes = await self._store.snapshot(request.user_id, request.query_id)
        yield Progress(query=query_pb(query), new_outcomes=[progress_pb(o) for o in outcomes])
        seen = {o.bank_code: o for o in outcomes}
        last = query
        while query.pending:
            await wait_for_event(changed, WATCH_SAFETY_POLL_S)
            changed = self._changes.current(request.query_id)
            query, outcomes = await self._store.snapshot(request.user_id, request.query_id)
            new = [o for o in outcomes if seen.get(o.bank_code) != o]
            if new or query != last:
                seen.update((o.bank_code, o) for o in new)
                last = query
                yield Progress(query=query_pb(query), new_outcomes=[progress_pb(o) for o in new])
