"""Asking the banks: one long-lived channel per bank, the banks of a fan-out asked in parallel,
a card's real-name check asked of the bank that issued it alone (told by its BIN), each call
under its own deadline (never past the caller's), retried with jittered backoff when the bank
says to try again (within a retry budget), failed fast while the bank's circuit breaker is open,
and held to the bank's bulkhead. Card numbers in a bank's answer are masked as they arrive
(`cards.mask_cards`); nothing here logs or traces personal data."""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode, get_current_span

from bank_connector.cards import MalformedAnswer, MaskedCard, mask_cards
from bank_connector.config import ConnectorConfig
from bank_connector.health import BankCallStats, BankHealthReport, HealthBook
from bank_connector.resilience import BreakerState, Bulkhead, CircuitBreaker, RetryBudget
from cardcheck.banks import BANK_CODES, BANKS, BY_CODE, MAX_BANK_CODES
from cardcheck.bins import BinTable, default_table
from cardcheck.numbers import card_number_valid, id_number_valid
from cardcheck.runtime.channels import CHANNEL_OPTIONS
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, invalid_argument
from cardcheck.runtime.renewing import RenewingChannel
from cardcheck.runtime.security import credentials_of
from cardcheck.runtime.tls import TlsFiles
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

AVAILABILITY_TTL = timedelta(seconds=3)  # how long one reachability check of an address holds
AVAILABILITY_TIMEOUT_S = 0.5
MIN_TIMEOUT_S = 0.001
CALLER_MARGIN_S = 0.25  # at most this much is kept back from the caller's deadline to deliver the outcomes


class OutcomeKind(enum.Enum):
    ANSWERED = "ANSWERED"
    TIMED_OUT = "TIMED_OUT"
    ERROR = "ERROR"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"


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


# The refusal of a card no bank issues (documented in bank_connector.proto and the README).
UNKNOWN_ISSUER = "no supported bank issues cards with this BIN"


def unknown_issuer() -> CardCheckError:
    """INVALID_ARGUMENT with a BadRequest violation on card_number, and ErrorInfo metadata
    `cause: UNKNOWN_ISSUER` that tells it from a malformed number without reading the text:
    the number is well formed, but no bank the service can ask issued it."""
    return CardCheckError(
        Reason.INVALID_ARGUMENT, "invalid: card_number (unknown issuer)", metadata={"cause": "UNKNOWN_ISSUER"},
        violations=[FieldViolation("card_number", UNKNOWN_ISSUER)],
    )


@dataclass(frozen=True)
class BankAvailability:
    code: str
    name: str
    kind: common_pb2.BankKind.ValueType
    available: bool


def call_timeout(per_bank_timeout_ms: int, default_s: float, caller_remaining_s: float | None) -> float:
    """A bank call's timeout: the request's per-bank deadline (0 = the default), ending a little
    before the caller's own deadline so that a late bank's TIMED_OUT still reaches the caller."""
    timeout = per_bank_timeout_ms / 1000 if per_bank_timeout_ms > 0 else default_s
    if caller_remaining_s is not None:
        margin = min(CALLER_MARGIN_S, caller_remaining_s / 5)
        timeout = min(timeout, caller_remaining_s - margin)
    return max(timeout, MIN_TIMEOUT_S)


MAX_NAME_CHARS = 64  # a person's name as a bank is asked it (the gateway accepts 30)


def known_banks(bank_codes: Sequence[str]) -> list[str]:
    """The requested banks, each once in the order asked; UNKNOWN_BANK for a code not served.
    Their number is checked before any of them is looked at."""
    if len(bank_codes) > MAX_BANK_CODES:
        raise invalid_argument([FieldViolation("bank_codes", f"at most {MAX_BANK_CODES} bank codes")])
    codes = list(dict.fromkeys(bank_codes))
    if not codes:
        raise invalid_argument([FieldViolation("bank_codes", "name at least one bank")])
    for code in codes:
        if code not in BY_CODE:
            raise CardCheckError(Reason.UNKNOWN_BANK, "unknown bank code", metadata={"bank_code": code[:32]})
    return codes


def check_person(id_number: str, name: str) -> None:
    violations = []
    if not id_number:
        violations.append(FieldViolation("id_number", "required"))
    elif not id_number_valid(id_number):
        violations.append(FieldViolation("id_number", "not a valid resident ID number"))
    if len(name) > MAX_NAME_CHARS:
        violations.append(FieldViolation("name", f"at most {MAX_NAME_CHARS} characters"))
    elif not name.strip():
        violations.append(FieldViolation("name", "required"))
    if violations:
        raise invalid_argument(violations)


async def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


# How a failed attempt bears on the bank's breaker: these say the bank is unwell; CANCELLED
# (the caller went away) says nothing; any other status is an answer from a working bank.
FAILURE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
})
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
ISSUING_BANK = "cardcheck.v1.IssuingBank"
MIN_ATTEMPT_S = 0.005  # no retry that would have less than this left before the deadline


Value = TypeVar("Value")


@dataclass(frozen=True)
class CallResult(Generic[Value]):
    """One bank call, retries included: `value` when answered, else why not."""

    kind: OutcomeKind
    value: Value | None = None
    detail: str = ""
    attempts: int = 0
    latency_ms: int = 0


@dataclass
class Launched:
    """A bank's first attempt, started by the fan-out itself (its bulkhead slot taken) so that
    every request is on its way before any per-bank bookkeeping runs. `taken` once the bank's
    own task has it; one never taken is cancelled by the fan-out."""

    call: grpc.aio.UnaryUnaryCall[Any, Any]
    started: float
    taken: bool = False


class BankLine:
    """Everything about calling one bank: its channel, breaker, bulkhead and retry budget."""

    def __init__(self, code: str, channel: grpc.aio.Channel, config: ConnectorConfig, clock: Clock,
                 stats: BankCallStats) -> None:
        self.code = code
        self.channel = channel
        self.stub = bank_pb2_grpc.IssuingBankStub(channel)
        self.breaker = CircuitBreaker(config.breaker, clock)
        self.bulkhead = Bulkhead(config.concurrency_of(code))
        self.budget = RetryBudget(clock, ratio=config.budget_ratio, floor=config.budget_floor,
                                  window=config.budget_window)
        self.stats = stats
        self.retries = 0
        self.outcomes: collections.Counter[OutcomeKind] = collections.Counter()  # calls, by how they ended


# A bank's answer lists one person's cards at that bank, 22 bytes each at least: 256 KiB is some
# 12,000 cards, far beyond anyone's; a larger answer fails the attempt (RESOURCE_EXHAUSTED)
# before it is parsed. Masked (49 bytes a card at most) it still fits the 1 MiB an outcome may be.
MAX_BANK_ANSWER_BYTES = 256 * 1024


def open_bank_channel(address: str, tls: TlsFiles | None = None) -> grpc.aio.Channel:
    """A channel with no interceptor: bank calls are traced by `BankConnector._attempt` itself.
    The tracing interceptor is left out on purpose: it costs an extra task per call, and a
    fan-out under an unsampled trace calls the banks with no trace headers at all
    (`traced_bank_calls`). `tls`: the bank's CA and the client certificate it requires, followed
    when they change (cardcheck/runtime/renewing.py); None: plaintext."""
    options = [*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", MAX_BANK_ANSWER_BYTES)]
    if tls is not None:
        return RenewingChannel(
            tls, credentials_of, lambda credentials: grpc.aio.secure_channel(address, credentials, options=options)
        )
    return grpc.aio.insecure_channel(address, options=options)


class BankConnector:
    """The banks behind their addresses (bank code -> host:port; several banks may share one)."""

    def __init__(
        self,
        bank_addresses: Mapping[str, str],
        *,
        tracer_provider: TracerProvider,
        clock: Clock,
        default_timeout_s: float,
        config: ConnectorConfig | None = None,
        rng: random.Random | None = None,
        bins: BinTable | None = None,
        bank_tls: Mapping[str, TlsFiles] | None = None,
    ) -> None:
        """`bank_tls`: the TLS of the banks named (the others plaintext)."""
        missing = [code for code in BANK_CODES if code not in bank_addresses]
        if missing:
            raise ValueError(f"no address for banks {missing}")
        self.config = config or ConnectorConfig()
        self._addresses = dict(bank_addresses)
        self._clock = clock
        self._rng = rng or random.Random()
        self._bins = bins if bins is not None else default_table()  # who issued a card, for the real-name check
        self.default_timeout_s = default_timeout_s
        self._health = HealthBook(BANK_CODES)
        self._lines = {
            code: BankLine(
                code, open_bank_channel(address, (bank_tls or {}).get(code)),
                self.config, clock, self._health.stats(code),
            )
            for code, address in self._addresses.items()
        }
        self._tracer = tracer_provider.get_tracer("bank_connector")
        self._tracing = not isinstance(self._tracer, NoOpTracer)  # OTEL_SDK_DISABLED
        self._reachable: dict[str, tuple[datetime, bool]] = {}
        self._reachability_lock = asyncio.Lock()

    async def close(self) -> None:
        await asyncio.gather(*(line.channel.close() for line in self._lines.values()))

    # -- the one place a bank is called ------------------------------------------------------

    async def call_bank(self, bank_code: str, method: str, request: Message, timeout_s: float,
                        accept: Callable[[Any], Value] = lambda response: response,
                        traced: bool = True, launched: Launched | None = None) -> CallResult[Value]:
        """One RPC at one bank, all attempts within `timeout_s`: failed fast while its breaker
        is open; each attempt waits for a bulkhead slot; UNAVAILABLE and RESOURCE_EXHAUSTED are
        retried after a jittered backoff while the retry budget and the deadline allow.
        `accept(response)` turns an answer into the result's value, raising MalformedAnswer for
        one that makes no sense (an error outcome that counts against the bank). `traced`:
        see `traced_bank_calls`. `launched`: the first attempt, already under way (`launch`)."""
        if launched is not None:
            launched.taken = True
        line = self._lines[bank_code]
        rpc: Callable[..., Awaitable[Any]] = getattr(line.stub, method)
        loop = asyncio.get_running_loop()
        started = loop.time() if launched is None else launched.started
        deadline = started + timeout_s
        line.budget.record_call()
        attempts = 0
        last_detail = ""

        def result(kind: OutcomeKind, detail: str = "", value: Value | None = None) -> CallResult[Value]:
            line.outcomes[kind] += 1
            return CallResult(kind, value, detail, attempts, round((loop.time() - started) * 1000))

        while True:
            if launched is None:
                if not line.breaker.allow():
                    if attempts == 0:
                        return result(OutcomeKind.CIRCUIT_OPEN, "CIRCUIT_OPEN")
                    return result(OutcomeKind.ERROR, last_detail)
                if not await line.bulkhead.acquire(max(deadline - loop.time(), 0)):
                    line.breaker.record_neutral()
                    return result(OutcomeKind.TIMED_OUT, "BULKHEAD_FULL")
            if attempts:
                line.retries += 1
            attempts += 1
            attempt_started = loop.time() if launched is None else launched.started
            try:
                if launched is not None:
                    call, launched = launched.call, None
                    response = await call
                else:
                    response = await self._attempt(
                        bank_code, method, rpc, request, max(deadline - attempt_started, MIN_TIMEOUT_S), traced
                    )
                value = accept(response)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                line.stats.record(False, (loop.time() - attempt_started) * 1000)
                if code in FAILURE_CODES:
                    line.breaker.record_failure()
                elif code == grpc.StatusCode.CANCELLED:
                    line.breaker.record_neutral()
                else:
                    line.breaker.record_success()
                last_detail = code.name
            except MalformedAnswer:
                line.stats.record(False, (loop.time() - attempt_started) * 1000)
                line.breaker.record_failure()
                log.warning("bank %s answered %s malformed", bank_code, method)
                return result(OutcomeKind.ERROR, "MALFORMED_ANSWER")
            except BaseException:  # cancelled with the fan-out: nothing learned about the bank
                line.breaker.record_neutral()
                raise
            else:
                line.stats.record(True, (loop.time() - attempt_started) * 1000)
                line.breaker.record_success()
                return result(OutcomeKind.ANSWERED, value=value)
            finally:
                line.bulkhead.release()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return result(OutcomeKind.TIMED_OUT, last_detail)
            if code not in RETRYABLE_CODES or attempts >= self.config.retry.max_attempts:
                return result(OutcomeKind.ERROR, last_detail)
            pause = self.config.retry.backoff_s(attempts, self._rng)
            if loop.time() + pause + MIN_ATTEMPT_S >= deadline or not line.budget.try_retry():
                return result(OutcomeKind.ERROR, last_detail)
            await asyncio.sleep(pause)

    def traced_bank_calls(self) -> bool:
        """Whether this fan-out's bank calls are traced: not with tracing off, nor under a trace
        that is not sampled. An untraced call carries no trace headers: a bank is another party
        and records nothing of an unsampled trace (bank_sim records only what a sampled trace
        hands it), and 24 calls of headers cost a fan-out about a third of a millisecond.
        Decided once per fan-out, not once per bank."""
        if not self._tracing:
            return False
        parent = get_current_span().get_span_context()
        return not (parent.is_valid and not parent.trace_flags.sampled)

    async def _attempt(
        self, bank_code: str, method: str, rpc: Callable[..., Awaitable[Any]], request: Message, timeout_s: float,
        traced: bool,
    ) -> Any:
        """One attempt; when `traced`, in a client span whose context goes to the bank in the
        metadata."""
        if not traced:
            return await rpc(request, timeout=timeout_s)
        with self._tracer.start_as_current_span(
            f"/{ISSUING_BANK}/{method}",
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": ISSUING_BANK, "rpc.method": method,
                        "cardcheck.bank_code": bank_code},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            carrier: dict[str, str] = {}
            inject(carrier)
            try:
                response = await rpc(request, timeout=timeout_s, metadata=tuple(carrier.items()) or None)
            except grpc.aio.AioRpcError as error:
                if span.is_recording():
                    span.set_attribute("rpc.grpc.status_code", error.code().value[0])
                    span.set_status(Status(StatusCode.ERROR, error.code().name))
                raise
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", 0)
            return response

    # -- fan-out -----------------------------------------------------------------------------

    def launch(self, bank_code: str, method: str, request: Message, timeout_s: float) -> Launched | None:
        """Starts a bank's first attempt now, when its breaker is closed and its bulkhead has a
        free slot; None leaves the whole call to `call_bank`. For untraced calls only (a traced
        attempt runs in its own span)."""
        line = self._lines[bank_code]
        if line.breaker.state is not BreakerState.CLOSED or not line.bulkhead.try_acquire():
            return None
        # The clock is read before the call is made: the call's deadline counts from the moment
        # it is made, so a pause in between (a garbage collection) can only lengthen the latency
        # reported, never show a deadline met early.
        started = asyncio.get_running_loop().time()
        call = getattr(line.stub, method)(request, timeout=max(timeout_s, MIN_TIMEOUT_S))
        return Launched(call, started)

    def _abandon(self, launched: Iterable[tuple[str, Launched | None]]) -> None:
        """First attempts whose task never ran (the fan-out ended first): cancelled, slots freed."""
        for bank_code, one in launched:
            if one is not None and not one.taken:
                one.taken = True
                one.call.cancel()
                self._lines[bank_code].bulkhead.release()

    async def _lookup(self, bank_code: str, request: bank_pb2.LookupCardsRequest, timeout_s: float,
                      traced: bool, launched: Launched | None) -> BankOutcome:
        called = await self.call_bank(
            bank_code, "LookupCards", request, timeout_s, lambda response: mask_cards(bank_code, response.cards),
            traced, launched,
        )
        return BankOutcome(
            bank_code, called.kind, cards=called.value or (), detail=called.detail, attempts=called.attempts,
            latency_ms=called.latency_ms,
        )

    async def fan_out(
        self, id_number: str, name: str, bank_codes: Sequence[str], deadline_s: float
    ) -> AsyncIterator[BankOutcome]:
        """Asks every bank at once and yields each bank's outcome as it arrives. Callers check
        the arguments first (`check_person`, `known_banks`)."""
        traced = self.traced_bank_calls()
        requests = {
            code: bank_pb2.LookupCardsRequest(bank_code=code, id_number=id_number, name=name) for code in bank_codes
        }
        # Every untraced first attempt is started before any task runs: the requests leave at
        # once, and the bookkeeping of each bank comes after, while the banks work.
        launched = [
            (code, None if traced else self.launch(code, "LookupCards", requests[code], deadline_s))
            for code in bank_codes
        ]
        tasks = [
            asyncio.create_task(self._lookup(code, requests[code], deadline_s, traced, first))
            for code, first in launched
        ]
        try:
            for next_outcome in asyncio.as_completed(tasks):
                yield await next_outcome
        finally:
            await _cancel(tasks)
            self._abandon(launched)

    # -- real-name check ---------------------------------------------------------------------

    async def verify_real_name(
        self, card_number: str, name: str, id_number: str, phone: str, deadline_s: float
    ) -> RealNameResult:
        """Asks the bank that issued the card, and no other, whether it holds the card under
        that name, ID and reserved phone. The issuer is the bank whose BIN the card carries
        (`cardcheck.bins`): a card whose BIN no bank claims is refused without asking anyone
        (`unknown_issuer`). When the issuer cannot be asked (down, breaker open, out of time,
        an answer that makes no sense), the check cannot be decided: SERVICE_UNAVAILABLE."""
        violations = []
        if not card_number_valid(card_number):
            violations.append(FieldViolation("card_number", "not a valid card number (16-19 digits, Luhn)"))
        for field, value in (("name", name), ("id_number", id_number), ("phone", phone)):
            if len(value) > MAX_NAME_CHARS:
                violations.append(FieldViolation(field, f"at most {MAX_NAME_CHARS} characters"))
            elif not value.strip():
                violations.append(FieldViolation(field, "required"))
        if violations:
            raise invalid_argument(violations)
        issuer = self._bins.issuer_of(card_number)
        if issuer is None:
            raise unknown_issuer()
        request = bank_pb2.VerifyCardRequest(
            bank_code=issuer, card_number=card_number, name=name, id_number=id_number, phone=phone
        )
        called = await self.call_bank(
            issuer, "VerifyCard", request, deadline_s, _sound_verdict, self.traced_bank_calls()
        )
        if called.value is None:
            raise CardCheckError(Reason.SERVICE_UNAVAILABLE, f"the card's bank could not be asked ({called.detail})")
        if called.value.confirmed:
            return RealNameResult(True, issuer)
        return RealNameResult(False)

    # -- availability and health -------------------------------------------------------------

    async def _probe(self, address: str) -> bool:
        code = next(code for code, at in self._addresses.items() if at == address)
        health = health_pb2_grpc.HealthStub(self._lines[code].channel)
        try:
            # grpcio-health-checking's stubs declare HealthStub without its methods.
            answer: health_pb2.HealthCheckResponse = await health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=AVAILABILITY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNIMPLEMENTED  # reachable, just no health service
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def availability(self) -> list[BankAvailability]:
        """Every bank, available when its address answers a health check (cached briefly) and
        its circuit breaker is not open."""
        async with self._reachability_lock:
            now = self._clock.now()
            stale = [
                address for address in dict.fromkeys(self._addresses.values())
                if address not in self._reachable or now - self._reachable[address][0] >= AVAILABILITY_TTL
            ]
            results = await asyncio.gather(*(self._probe(address) for address in stale))
            for address, reachable in zip(stale, results, strict=True):
                self._reachable[address] = (now, reachable)
        return [
            BankAvailability(
                bank.code, bank.name, bank.kind,
                self._reachable[self._addresses[bank.code]][1]
                and self._lines[bank.code].breaker.state is not BreakerState.OPEN,
            )
            for bank in BANKS
        ]

    def lines(self) -> Mapping[str, BankLine]:
        """Each bank's line, by bank code (read by bank_connector/metrics.py at each scrape)."""
        return self._lines

    def health(self) -> list[BankHealthReport]:
        return [
            replace(
                line.stats.report(code),
                breaker_state=line.breaker.state.value,
                retries=line.retries,
                short_circuited=line.breaker.rejected,
                breaker_openings=line.breaker.openings,
                in_flight=line.bulkhead.in_use,
                concurrency_limit=line.bulkhead.limit,
                waiting=line.bulkhead.waiting,
            )
            for code, line in self._lines.items()
        ]


def _sound_verdict(answer: bank_pb2.VerifyCardResponse) -> bank_pb2.VerifyCardResponse:
    if answer.confirmed and not answer.holds_card:
        raise MalformedAnswer("a bank confirmed a card it does not hold")
    return answer
