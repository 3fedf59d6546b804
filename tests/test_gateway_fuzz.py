"""Property: whatever a client sends to any public RPC of a real gateway (arbitrary unicode in
every string, unknown enum numbers, long repeated fields, random metadata and session tokens,
random bytes as the message itself), the answer is a response or a documented refusal: never
INTERNAL or UNKNOWN, never a reason docs/api.md does not list, always with its ErrorInfo and zh-CN
message (and a BadRequest or RetryInfo where the reason calls for one), and the gateway keeps
serving.

Hypothesis runs in a worker thread; each example's calls run on the test's event loop, where
the gateway, the notifier and the fakes serve."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardcheck.banks import BANK_CODES
from cardcheck.runtime.errors import DOMAIN, REASONS
from cardcheck.runtime.settings import ALL_REGIONS
from cardcheck.v1 import gateway_pb2
from gateway.agreement import CURRENT
from gateway.config import GatewayConfig
from tests.harness.gateway import ALICE, BOB, CAROL, PASSWORD, Stack

EXAMPLES_PER_RPC = 50
RAW_EXAMPLES = 120

# docs/api.md's error table.
DOCUMENTED = {
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "NOT_FOUND",
    "UNKNOWN_BANK",
    "CONSENT_REQUIRED",
    "VERIFICATION_FAILED",
    "REAL_NAME_CHECK_FAILED",
    "ALREADY_REGISTERED",
    "REGION_NOT_SUPPORTED",
    "QUERY_IN_PROGRESS",
    "COOLDOWN_ACTIVE",
    "REPORT_NOT_READY",
    "REPORT_EXPIRED",
    "PAYMENT_PASSWORD_INVALID",
    "PAYMENT_PASSWORD_LOCKED",
    "SERVICE_BUSY",
    "RATE_LIMITED",
}
# And PAYMENT_PASSWORD_LOCKED, unless only a reset unlocks it (`reset_required`).
WITH_RETRY_INFO = {"SERVICE_BUSY", "RATE_LIMITED"}
METHODS = gateway_pb2.DESCRIPTOR.services_by_name["CardCheck"].methods_by_name

# --- strategies --------------------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # any encodable unicode
tricky = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\n",
        "é",
        "١٢٣٤٥٦",  # Arabic-Indic digits
        "１２３４５６",  # full-width digits
        "²" * 16,  # digits to str.isdigit, not to int()
        "13812345678\n",
        "9" * 400,
        "../../etc/passwd",
        "' OR 1=1 --",
        "%s%n",
        "\u202e",
    ]
)


def field(*valid: str) -> st.SearchStrategy[str]:
    """Half the time a plausible value (so the deeper checks run), else tricky or arbitrary."""
    plausible = [v for v in valid if v]
    options = [tricky, any_text]
    if plausible:
        options = [st.sampled_from(plausible), st.sampled_from(plausible), *options]
    return st.one_of(*options)


enum_value = st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1))
phones = field(ALICE.phone, BOB.phone, CAROL.phone, "13900000001", "12345678901")
challenge_ids = field("0" * 32, "f" * 32, "a" * 31)
codes = field("000000", "123456", "12345")


def requests(rpc: str, query_id: str) -> st.SearchStrategy:
    if rpc in ("ListBanks", "GetAgreement", "ListQueries", "StartFaceCheck"):
        return st.just(getattr(gateway_pb2, f"{rpc}Request")())
    if rpc == "RequestSmsCode":
        return st.builds(gateway_pb2.RequestSmsCodeRequest, phone=phones, purpose=enum_value)
    if rpc == "Register":
        return st.builds(
            gateway_pb2.RegisterRequest,
            name=field(ALICE.name, CAROL.name, "John Smith"),
            id_number=field(ALICE.id_number, CAROL.id_number, CAROL.id_number.lower(), "1" * 18),
            phone=phones,
            challenge_id=challenge_ids,
            sms_code=codes,
            card_number=field(ALICE.card_number, "6" * 16, "6" * 20),
            payment_password=field(PASSWORD, "12345a"),
            region=field(*ALL_REGIONS[:5], "CN-XX", "cn-jl"),
        )
    if rpc == "SignIn":
        return st.builds(gateway_pb2.SignInRequest, phone=phones, challenge_id=challenge_ids, sms_code=codes)
    if rpc == "SignOut":
        return st.builds(gateway_pb2.SignOutRequest, everywhere=st.booleans())
    if rpc == "SubmitQuery":
        return st.builds(
            gateway_pb2.SubmitQueryRequest,
            bank_codes=st.one_of(
                st.lists(st.sampled_from(BANK_CODES), max_size=30),
                st.lists(field(*BANK_CODES, "icbc", "NOSUCHBANK"), max_size=120),
            ),
            agreement_version=field(CURRENT.version, "2020-01"),
            consent_given=st.booleans(),
            challenge_id=challenge_ids,
            sms_code=codes,
            face_token=field("sandbox:pass", "sandbox:fail", "x" * 5000),
            idempotency_key=field("key-1", "key 2", "k" * 129),
        )
    if rpc == "WatchQuery":
        return st.builds(gateway_pb2.WatchQueryRequest, query_id=field(query_id, "q1", "-" * 65))
    if rpc == "GetReport":
        return st.builds(
            gateway_pb2.GetReportRequest,
            query_id=field(query_id, "q1"),
            payment_password=field(PASSWORD, "000000"),
        )
    if rpc == "ResetPaymentPassword":
        return st.builds(
            gateway_pb2.ResetPaymentPasswordRequest,
            challenge_id=challenge_ids,
            sms_code=codes,
            face_token=field("sandbox:pass", "sandbox:fail", "x" * 5000),
            new_payment_password=field(PASSWORD, "12345a"),
        )
    raise AssertionError(f"no strategy for {rpc}")


_RESERVED = re.compile(r"^(grpc-.*|te|content-type|user-agent|host|:.*|authorization)$")
header_keys = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True).filter(
    lambda k: not _RESERVED.match(k)
)
ascii_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
extra_metadata = st.lists(
    st.one_of(
        st.tuples(header_keys.filter(lambda k: not k.endswith("-bin")), ascii_values.map(str.strip)),
        st.tuples(header_keys.map(lambda k: k.removesuffix("-bin") + "-bin"), st.binary(max_size=40)),
    ),
    max_size=4,
)


def authorizations(tokens: list[str]) -> st.SearchStrategy[str | None]:
    def mutate(data: tuple[str, int, str]) -> str:
        token, at, char = data
        at %= len(token)
        return token[:at] + char + token[at + 1 :]

    forged = st.tuples(st.sampled_from(tokens), st.integers(0, 500), st.sampled_from("A0_-.x")).map(mutate)
    token = st.one_of(st.sampled_from(tokens), forged, ascii_values)
    return st.one_of(
        st.sampled_from(tokens).map(lambda t: f"Bearer {t}"),  # often the real session
        st.none(),
        token.map(lambda t: f"Bearer {t}".strip()),
        st.tuples(st.sampled_from(["bearer", "Basic", "BEARER", ""]), token).map(
            lambda pair: f"{pair[0]} {pair[1]}".strip()
        ),
    )


# --- what every answer must be ------------------------------------------------------------------


def check_answer(rpc: str, error: grpc.aio.AioRpcError | None) -> str:
    """The reason of a refusal (or OK), after checking it is a documented one, fully dressed."""
    if error is None:
        return "OK"
    code = error.code()
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (rpc, code, error.details())
    status = rpc_status.from_call(error)
    assert status is not None, (rpc, code, error.details())
    details: dict[str, object] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.LocalizedMessage,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                details[kind.__name__] = message
    info = details.get("ErrorInfo")
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.domain == DOMAIN, (rpc, status)
    assert info.reason in DOCUMENTED, (rpc, info.reason, status.message)
    assert code == REASONS[info.reason].code, (rpc, info.reason, code)
    localized = details.get("LocalizedMessage")
    assert isinstance(localized, error_details_pb2.LocalizedMessage) and localized.locale == "zh-CN"
    assert re.search(r"[\u4e00-\u9fff]", localized.message)
    if info.reason == "INVALID_ARGUMENT":
        bad = details.get("BadRequest")
        assert isinstance(bad, error_details_pb2.BadRequest) and bad.field_violations, (rpc, status)
    if info.reason in WITH_RETRY_INFO:
        assert "RetryInfo" in details, (rpc, info.reason)
    if info.reason == "PAYMENT_PASSWORD_LOCKED":
        assert ("RetryInfo" in details) == (info.metadata.get("reset_required") != "true"), (rpc, status)
    return info.reason


@dataclass
class Fuzzer:
    stack: Stack
    loop: asyncio.AbstractEventLoop
    seen: dict[str, set[str]]

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _call(self, rpc: str, request, metadata) -> grpc.aio.AioRpcError | None:
        channel = self.stack.channels[0]
        path = f"/cardcheck.v1.CardCheck/{rpc}"
        serialize = (lambda raw: raw) if isinstance(request, bytes) else (lambda m: m.SerializeToString())
        try:
            if METHODS[rpc].server_streaming:
                call = channel.unary_stream(path, request_serializer=serialize)(
                    request, metadata=metadata, timeout=30
                )
                async for _ in call:
                    pass
            else:
                await channel.unary_unary(path, request_serializer=serialize)(
                    request, metadata=metadata, timeout=30
                )
        except grpc.aio.AioRpcError as error:
            return error
        return None

    def call(self, rpc: str, request, authorization: str | None, extra) -> None:
        metadata = list(extra)
        if authorization is not None:
            metadata.append(("authorization", authorization))
        error = self.run(self._call(rpc, request, tuple(metadata)))
        self.seen.setdefault(rpc, set()).add(check_answer(rpc, error))


async def _prepare(stack: Stack) -> tuple[list[str], str]:
    """Two users with sessions (BOB's for SignOut, which may revoke it) and one query."""
    alice = await stack.register(ALICE)
    bob = await stack.register(BOB)
    query = await stack.submit(ALICE, alice.session_token)
    return [alice.session_token, bob.session_token], query.query_id


@pytest.fixture
async def fuzzer(start_stack) -> Fuzzer:
    stack = await start_stack(
        # Generous per-user and per-caller budgets, so that most examples go past the limits.
        config=GatewayConfig(
            sms_caller_burst=1e6, sms_user_burst=1e6, submit_user_burst=1e6, report_user_burst=1e6
        )
    )
    return Fuzzer(stack, asyncio.get_running_loop(), {})


async def test_any_request_to_any_rpc_gets_a_documented_answer(fuzzer: Fuzzer):
    tokens, query_id = await _prepare(fuzzer.stack)
    alice_token, bob_token = tokens

    def property_of(rpc: str):
        # SignOut takes BOB's session (and maybe revokes it); every other RPC ALICE's.
        usable = [bob_token] if rpc == "SignOut" else [alice_token]

        @settings(
            max_examples=EXAMPLES_PER_RPC,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=requests(rpc, query_id), authorization=authorizations(usable), extra=extra_metadata)
        def prop(request, authorization, extra):
            fuzzer.call(rpc, request, authorization, extra)

        return prop

    @settings(
        max_examples=RAW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=st.data(), rpc=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=64))
    def raw_bytes(data, rpc, payload):
        # Random bytes may well be a valid SignOutRequest: that one gets BOB's session only.
        authorization = data.draw(authorizations([bob_token] if rpc == "SignOut" else [alice_token]))
        fuzzer.call(rpc, payload, authorization, ())

    def run_all() -> None:
        for rpc in METHODS:
            property_of(rpc)()
        raw_bytes()

    await asyncio.to_thread(run_all)

    # Every RPC was reached, and the deeper answers occurred, not only input refusals.
    assert set(fuzzer.seen) == set(METHODS)
    reasons = set().union(*fuzzer.seen.values())
    assert {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "VERIFICATION_FAILED"} <= reasons, fuzzer.seen
    # Still serving, and ALICE's session still works.
    agreement = await fuzzer.stack.gateway.GetAgreement(gateway_pb2.GetAgreementRequest())
    assert agreement.version == CURRENT.version
    await fuzzer.stack.gateway.ListQueries(
        gateway_pb2.ListQueriesRequest(), metadata=(("authorization", f"Bearer {alice_token}"),)
    )
