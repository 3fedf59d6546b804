"""Asking the banks: one long-lived channel per bank address, every bank asked in parallel,
each call timed and recorded. Card numbers in a bank's answer are masked as they arrive
(`cards.mask_cards`); nothing here logs or traces personal data."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from bank_connector.cards import MalformedAnswer, MaskedCard, mask_cards
from bank_connector.health import BankHealthReport, HealthBook
from cardcheck.banks import BANK_CODES, BANKS, BY_CODE
from cardcheck.numbers import card_number_valid, id_number_valid
from cardcheck.runtime.channels import open_channel
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.errors import CardCheckError, FieldViolation, invalid_argument
from cardcheck.v1 import bank_pb2, bank_pb2_grpc

log = logging.getLogger(__name__)

AVAILABILITY_TTL = timedelta(seconds=3)  # how long one reachability check of an address holds
AVAILABILITY_TIMEOUT_S = 0.5
MIN_TIMEOUT_S = 0.001
CALLER_MARGIN_S = 0.25  # at most this much is kept back from the caller's deadline to deliver the outcomes


class OutcomeKind(enum.Enum):
    ANSWERED = "ANSWERED"
    TIMED_OUT = "TIMED_OUT"
    ERROR = "ERROR"


@dataclass(frozen=True)
class BankOutcome:
    """How one bank's part of a fan-out ended. `detail` is a status code name, never data."""

    bank_code: str
    kind: OutcomeKind
    cards: tuple[MaskedCard, ...] = ()
    detail: str = ""
    attempts: int = 1
    latency_ms: int = 0


@dataclass(frozen=True)
class RealNameResult:
    confirmed: bool
    bank_code: str | None = None  # the confirming bank


@dataclass(frozen=True)
class BankAvailability:
    code: str
    name: str
    kind: int  # common_pb2.BankKind
    available: bool


def call_timeout(per_bank_timeout_ms: int, default_s: float, caller_remaining_s: float | None) -> float:
    """A bank call's timeout: the request's per-bank deadline (0 = the default), ending a little
    before the caller's own deadline so that a late bank's TIMED_OUT still reaches the caller."""
    timeout = per_bank_timeout_ms / 1000 if per_bank_timeout_ms > 0 else default_s
    if caller_remaining_s is not None:
        margin = min(CALLER_MARGIN_S, caller_remaining_s / 5)
        timeout = min(timeout, caller_remaining_s - margin)
    return max(timeout, MIN_TIMEOUT_S)


def known_banks(bank_codes: Iterable[str]) -> list[str]:
    """The requested banks, each once in the order asked; UNKNOWN_BANK for a code not served."""
    codes = list(dict.fromkeys(bank_codes))
    if not codes:
        raise invalid_argument([FieldViolation("bank_codes", "name at least one bank")])
    for code in codes:
        if code not in BY_CODE:
            raise CardCheckError("UNKNOWN_BANK", "unknown bank code", metadata={"bank_code": code[:32]})
    return codes


def check_person(id_number: str, name: str) -> None:
    violations = []
    if not id_number:
        violations.append(FieldViolation("id_number", "required"))
    elif not id_number_valid(id_number):
        violations.append(FieldViolation("id_number", "not a valid resident ID number"))
    if not name.strip():
        violations.append(FieldViolation("name", "required"))
    if violations:
        raise invalid_argument(violations)


async def _cancel(tasks: Iterable[asyncio.Task]) -> None:
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


class BankConnector:
    """The banks behind their addresses (bank code -> host:port; several banks may share one)."""

    def __init__(
        self,
        bank_addresses: Mapping[str, str],
        *,
        tracer_provider: TracerProvider,
        clock: Clock,
        default_timeout_s: float,
    ) -> None:
        missing = [code for code in BANK_CODES if code not in bank_addresses]
        if missing:
            raise ValueError(f"no address for banks {missing}")
        self._addresses = dict(bank_addresses)
        self._channels: dict[str, grpc.aio.Channel] = {}
        for address in dict.fromkeys(self._addresses.values()):
            self._channels[address] = open_channel(address, tracer_provider)
        self._stubs = {
            code: bank_pb2_grpc.IssuingBankStub(self._channels[address])
            for code, address in self._addresses.items()
        }
        self._tracer = tracer_provider.get_tracer("bank_connector")
        self._clock = clock
        self.default_timeout_s = default_timeout_s
        self._health = HealthBook(BANK_CODES)
        self._reachable: dict[str, tuple[datetime, bool]] = {}
        self._reachability_lock = asyncio.Lock()

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    # -- the one place a bank is called ------------------------------------------------------

    async def call_bank(self, bank_code: str, method: str, request, deadline_s: float):
        """One attempt of one RPC at one bank, timed and recorded in the bank's health. Raises
        the AioRpcError of a failed call. Retries and circuit breakers are to wrap this."""
        rpc: Callable[..., Awaitable] = getattr(self._stubs[bank_code], method)
        with self._tracer.start_as_current_span(
            f"bank {method}",
            attributes={"cardcheck.bank_code": bank_code},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            started = time.monotonic()
            try:
                response = await rpc(request, timeout=deadline_s)
            except grpc.aio.AioRpcError as error:
                self._health.record(bank_code, False, (time.monotonic() - started) * 1000)
                span.set_status(Status(StatusCode.ERROR, error.code().name))
                raise
            self._health.record(bank_code, True, (time.monotonic() - started) * 1000)
            return response

    # -- fan-out -----------------------------------------------------------------------------

    async def _lookup(self, bank_code: str, id_number: str, name: str, deadline_s: float) -> BankOutcome:
        request = bank_pb2.LookupCardsRequest(bank_code=bank_code, id_number=id_number, name=name)
        started = time.monotonic()

        def elapsed_ms() -> int:
            return round((time.monotonic() - started) * 1000)

        try:
            response = await self.call_bank(bank_code, "LookupCards", request, deadline_s)
            cards = mask_cards(bank_code, response.cards)
        except grpc.aio.AioRpcError as error:
            kind = OutcomeKind.TIMED_OUT if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else OutcomeKind.ERROR
            return BankOutcome(bank_code, kind, detail=error.code().name, latency_ms=elapsed_ms())
        except MalformedAnswer:
            log.warning("bank %s answered a malformed card", bank_code)
            return BankOutcome(bank_code, OutcomeKind.ERROR, detail="MALFORMED_ANSWER", latency_ms=elapsed_ms())
        return BankOutcome(bank_code, OutcomeKind.ANSWERED, cards=cards, latency_ms=elapsed_ms())

    async def fan_out(
        self, id_number: str, name: str, bank_codes: Sequence[str], deadline_s: float
    ) -> AsyncIterator[BankOutcome]:
        """Asks every bank at once and yields each bank's outcome as it arrives. Callers check
        the arguments first (`check_person`, `known_banks`)."""
        tasks = [asyncio.create_task(self._lookup(code, id_number, name, deadline_s)) for code in bank_codes]
        try:
            for next_outcome in asyncio.as_completed(tasks):
                yield await next_outcome
        finally:
            await _cancel(tasks)

    # -- real-name check ---------------------------------------------------------------------

    async def _verify_at(self, bank_code: str, request: bank_pb2.VerifyCardRequest, deadline_s: float):
        per_bank = bank_pb2.VerifyCardRequest()
        per_bank.CopyFrom(request)
        per_bank.bank_code = bank_code
        try:
            return bank_code, await self.call_bank(bank_code, "VerifyCard", per_bank, deadline_s)
        except grpc.aio.AioRpcError:
            return bank_code, None

    async def verify_real_name(
        self, card_number: str, name: str, id_number: str, phone: str, deadline_s: float
    ) -> RealNameResult:
        """Asks every bank whether it holds the card under that name, ID and reserved phone.
        Confirmed by the first bank that confirms. When none does and the card's bank may be
        among those that could not answer, the check cannot be decided: SERVICE_UNAVAILABLE."""
        violations = []
        if not card_number_valid(card_number):
            violations.append(FieldViolation("card_number", "not a valid card number (16-19 digits, Luhn)"))
        for field, value in (("name", name), ("id_number", id_number), ("phone", phone)):
            if not value.strip():
                violations.append(FieldViolation(field, "required"))
        if violations:
            raise invalid_argument(violations)
        request = bank_pb2.VerifyCardRequest(card_number=card_number, name=name, id_number=id_number, phone=phone)
        tasks = [asyncio.create_task(self._verify_at(code, request, deadline_s)) for code in BANK_CODES]
        held = False
        unanswered = 0
        try:
            for next_answer in asyncio.as_completed(tasks):
                code, answer = await next_answer
                if answer is None:
                    unanswered += 1
                elif answer.confirmed:
                    return RealNameResult(True, code)
                elif answer.holds_card:
                    held = True
        finally:
            await _cancel(tasks)
        if not held and unanswered:
            raise CardCheckError(
                "SERVICE_UNAVAILABLE", f"{unanswered} bank(s) could not be asked about the card"
            )
        return RealNameResult(False)

    # -- availability and health -------------------------------------------------------------

    async def _probe(self, address: str) -> bool:
        health = health_pb2_grpc.HealthStub(self._channels[address])
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=AVAILABILITY_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNIMPLEMENTED  # reachable, just no health service
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def availability(self) -> list[BankAvailability]:
        """Every bank, available when its address answers a health check (cached briefly)."""
        async with self._reachability_lock:
            now = self._clock.now()
            stale = [
                address for address in self._channels
                if address not in self._reachable or now - self._reachable[address][0] >= AVAILABILITY_TTL
            ]
            results = await asyncio.gather(*(self._probe(address) for address in stale))
            for address, reachable in zip(stale, results, strict=True):
                self._reachable[address] = (now, reachable)
        return [
            BankAvailability(bank.code, bank.name, bank.kind, self._reachable[self._addresses[bank.code]][1])
            for bank in BANKS
        ]

    def health(self) -> list[BankHealthReport]:
        return self._health.reports()
