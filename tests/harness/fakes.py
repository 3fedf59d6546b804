"""Fakes of the internal services, served on real grpc.aio servers: what a caller of
bank_connector, report_service or the banks sees, scripted and counted by the test."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Mapping

import grpc
from google.protobuf import timestamp_pb2

from cardcheck.banks import BANKS
from cardcheck.numbers import luhn_check_digit
from cardcheck.runtime.errors import CardCheckError, abort
from cardcheck.v1 import (
    bank_connector_pb2,
    bank_connector_pb2_grpc,
    bank_pb2,
    bank_pb2_grpc,
    common_pb2,
    report_service_pb2,
    report_service_pb2_grpc,
)

ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED


class FakeBankConnector(bank_connector_pb2_grpc.BankConnectorServicer):
    """bank_connector for its two callers. The gateway's: a real-name check confirms the cards
    enrolled, ListBanks lists every bank, some unavailable. report_service's: FanOut streams the
    scripted outcome of each bank in the order asked (a bank not scripted answers, with no
    cards); a bank's script may be a list, each ask takes the next outcome, the last one repeats;
    a held bank answers once released. With `subject`, every fan-out must be about that person."""

    def __init__(
        self,
        script: Mapping[str, object] | None = None,
        subject: report_service_pb2.Subject | None = None,
    ) -> None:
        self.enrolled: dict[tuple[str, str, str, str], str] = {}
        self.unavailable: set[str] = {"GDRCC", "CQFMB"}
        self.verify_calls: list[bank_connector_pb2.VerifyRealNameRequest] = []
        self.script: dict[str, object] = dict(script or {})
        self.subject = subject
        self.gates: dict[str, asyncio.Event] = {}
        self.asked: list[list[str]] = []

    def enrol(self, person, bank: str = "ICBC") -> None:
        """`person`: its card_number, name, id_number and phone."""
        self.enrolled[(person.card_number, person.name, person.id_number.upper(), person.phone)] = bank

    def hold(self, *banks: str) -> None:
        for bank in banks:
            self.gates[bank] = asyncio.Event()

    def release(self, *banks: str) -> None:
        for bank in banks:
            self.gates.pop(bank).set()

    async def VerifyRealName(self, request, context):
        self.verify_calls.append(request)
        bank = self.enrolled.get((request.card_number, request.name, request.id_number, request.phone))
        return bank_connector_pb2.VerifyRealNameResponse(confirmed=bank is not None, bank_code=bank or "")

    async def ListBanks(self, request, context):
        return bank_connector_pb2.BankConnectorListBanksResponse(
            banks=[
                common_pb2.Bank(code=b.code, name=b.name, kind=b.kind, available=b.code not in self.unavailable)
                for b in BANKS
            ]
        )

    async def FanOut(self, request, context):
        self.asked.append(list(request.bank_codes))
        if self.subject is not None:
            assert request.id_number == self.subject.id_number and request.name == self.subject.name
        for bank in request.bank_codes:
            gate = self.gates.get(bank)
            if gate is not None:
                await gate.wait()
            scripted = self.script.get(bank, bank_connector_pb2.FanOutResponse(bank_code=bank, kind=ANSWERED))
            if isinstance(scripted, list):
                scripted = scripted.pop(0) if len(scripted) > 1 else scripted[0]
            yield scripted


def _now_pb() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeReportService(report_service_pb2_grpc.ReportServiceServicer):
    """report_service as the gateway sees it: queries kept in memory, each one's owner checked;
    a refusal set makes CreateQuery refuse; a watch gives the query, then the query READY."""

    def __init__(self) -> None:
        self.created: list = []
        self.queries: dict[str, tuple[str, common_pb2.Query]] = {}  # query_id -> (user_id, query)
        self.by_key: dict[tuple[str, str], str] = {}
        self.refusal: CardCheckError | None = None
        self.report_calls: list = []
        # WatchQuery: with hold_watches, each stream stays open after its first event until the
        # gateway cancels it (counted in watches_cancelled); the deadline each stream had.
        self.hold_watches = False
        self.watch_deadlines: list[float | None] = []
        self.watches_open = 0
        self.watches_cancelled = 0
        # What a watch of a query named here sends instead, message by message, then ends.
        self.progress: dict[str, list[report_service_pb2.ReportServiceWatchQueryResponse]] = {}

    async def CreateQuery(self, request, context):
        self.created.append(request)
        if self.refusal is not None:
            await abort(context, self.refusal)
        key = (request.user_id, request.idempotency_key)
        if key in self.by_key:
            return report_service_pb2.CreateQueryResponse(query=self.queries[self.by_key[key]][1])
        query = common_pb2.Query(
            query_id=uuid.uuid4().hex,
            status=common_pb2.QUERY_STATUS_PENDING,
            bank_codes=request.bank_codes,
            submitted_at=_now_pb(),
            banks_total=len(request.bank_codes),
            agreement_version=request.agreement_version,
        )
        self.queries[query.query_id] = (request.user_id, query)
        self.by_key[key] = query.query_id
        return report_service_pb2.CreateQueryResponse(query=query)

    def _own(self, user_id: str, query_id: str) -> common_pb2.Query | None:
        owner, query = self.queries.get(query_id, (None, None))
        return query if owner == user_id else None

    async def GetQuery(self, request, context):
        query = self._own(request.user_id, request.query_id)
        if query is None:
            await abort(context, CardCheckError("NOT_FOUND"))
        return report_service_pb2.GetQueryResponse(query=query)

    async def ListQueries(self, request, context):
        mine = [q for owner, q in self.queries.values() if owner == request.user_id]
        return report_service_pb2.ReportServiceListQueriesResponse(queries=list(reversed(mine)))

    async def WatchQuery(self, request, context):
        query = self._own(request.user_id, request.query_id)
        if query is None:
            await abort(context, CardCheckError("NOT_FOUND"))
        self.watch_deadlines.append(context.time_remaining())
        if request.query_id in self.progress:
            for message in self.progress[request.query_id]:
                yield message
            return
        yield report_service_pb2.ReportServiceWatchQueryResponse(query=query)
        if self.hold_watches:
            self.watches_open += 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.watches_cancelled += 1
                raise
            finally:
                self.watches_open -= 1
        done = common_pb2.Query()
        done.CopyFrom(query)
        done.status = common_pb2.QUERY_STATUS_READY
        done.banks_answered = done.banks_total
        answered = report_service_pb2.BankProgress(bank_code="ICBC", kind=common_pb2.BANK_OUTCOME_KIND_ANSWERED)
        yield report_service_pb2.ReportServiceWatchQueryResponse(query=done, new_outcomes=[answered])

    async def GetReport(self, request, context):
        self.report_calls.append(request)
        if self._own(request.user_id, request.query_id) is None:
            await abort(context, CardCheckError("NOT_FOUND"))
        report = common_pb2.Report(
            query_id=request.query_id,
            summary=[common_pb2.BankSummary(bank_code="ICBC", bank_name="中国工商银行", debit_count=1)],
            notice="请做到不出租、出借、出售银行卡",
        )
        return report_service_pb2.ReportServiceGetReportResponse(report=report)


def _pan(i: int) -> str:
    partial = f"622202{i:09d}"
    return partial + luhn_check_digit(partial)


class CountingBanks(bank_pb2_grpc.IssuingBankServicer):
    """Every bank on one port: each answers one debit card after its latency, and counts how
    often it was asked about whom."""

    def __init__(self, latency_s: Mapping[str, float], default_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.default_s = default_s
        self.lookups: Counter[tuple[str, str]] = Counter()  # (id_number, bank_code)
        self.answered: Counter[tuple[str, str]] = Counter()

    async def LookupCards(self, request, context):
        self.lookups[(request.id_number, request.bank_code)] += 1
        await asyncio.sleep(self.latency_s.get(request.bank_code, self.default_s))
        self.answered[(request.id_number, request.bank_code)] += 1
        return bank_pb2.LookupCardsResponse(
            cards=[bank_pb2.BankCard(pan=_pan(len(self.answered)), card_type=common_pb2.CARD_TYPE_DEBIT)]
        )


async def serve(*servicers) -> tuple[grpc.aio.Server, int]:
    """One grpc.aio server on a port of its own for the fakes (each added by its type): the
    server, to stop, and its port."""
    server = grpc.aio.server()
    for servicer in servicers:
        for base in type(servicer).__mro__:
            adder = _ADDERS.get(base)
            if adder is not None:
                adder(servicer, server)
                break
        else:
            raise TypeError(f"no service for {type(servicer).__name__}")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


_ADDERS = {
    bank_connector_pb2_grpc.BankConnectorServicer: bank_connector_pb2_grpc.add_BankConnectorServicer_to_server,
    report_service_pb2_grpc.ReportServiceServicer: report_service_pb2_grpc.add_ReportServiceServicer_to_server,
    bank_pb2_grpc.IssuingBankServicer: bank_pb2_grpc.add_IssuingBankServicer_to_server,
}
