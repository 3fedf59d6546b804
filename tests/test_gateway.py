"""The gateway against a real grpc.aio server on port 0, its storage on SQLite and PostgreSQL,
the real notifier (its sandbox inbox gives the SMS codes), and small fakes of report_service and
bank_connector (tests/harness/gateway.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event, inspect, text

from bank_connector.app import build as build_bank_connector
from bank_sim.app import build as build_bank_sim
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.client import CardCheckClient
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import make_engine
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import load_master_key
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    bank_pb2,
    bank_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)
from gateway.agreement import CURRENT
from gateway.config import GatewayConfig
from notifier.providers import DeliveryError, OutgoingSms, SandboxProvider
from tests.harness.gateway import (
    ALICE,
    BOB,
    BOB_USER,
    CAROL,
    PASSWORD,
    QUERY_AUTH,
    REGISTER,
    SIGN_IN,
    Person,
    Stack,
    bearer,
    complete_card_number,
    complete_id_number,
    refused,
)
from tests.harness.processes import ServiceProcess

BANK_RECORDS = dataset.generate(424242, 20)  # what the real bank_sim holds, where a test runs one


# --- validation ------------------------------------------------------------------------------


async def test_register_names_every_invalid_field(stack: Stack):
    request = gateway_pb2.RegisterRequest(
        name="Bob123",
        id_number="220102199003071234",  # wrong check digit
        phone="12345",
        challenge_id="nope",
        sms_code="12a456",
        card_number="6222021000123456780",  # fails Luhn
        payment_password="12345",
        region="CN-XX",
    )
    refusal = await refused(
        stack.gateway.Register(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    assert set(refusal.violations) == {
        "name",
        "id_number",
        "phone",
        "challenge_id",
        "sms_code",
        "card_number",
        "payment_password",
        "region",
    }
    # Empty fields are named too.
    refusal = await refused(
        stack.gateway.Register(gateway_pb2.RegisterRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert len(refusal.violations) == 8 and set(refusal.violations.values()) == {"required"}


@pytest.mark.parametrize(
    "name, valid",
    [
        ("张三", True),
        ("阿依古丽·买买提", True),
        ("John Smith", True),
        ("", False),
        ("张" * 31, False),
        ("张三1", False),
        ("·张三", False),
        ("张三·", False),
        ("<script>", False),
    ],
)
def test_name_rule(name: str, valid: bool):
    from gateway.validation import Violations

    problems = Violations()
    problems.name(name)
    assert (not problems.items) == valid


async def test_id_number_born_in_the_future_is_invalid(stack: Stack):
    # Valid check digit, but born after the clock's today (2026-01-05).
    future = complete_id_number("22010220270101123")
    challenge_id, code = await stack.challenge(REGISTER, ALICE.phone)
    refusal = await refused(
        stack.gateway.Register(stack.register_request(ALICE, challenge_id, code, id_number=future)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"id_number"}


async def test_other_rpcs_name_their_invalid_fields(stack: Stack):
    refusal = await refused(
        stack.gateway.RequestSmsCode(gateway_pb2.RequestSmsCodeRequest(phone="1381234567")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"purpose"}  # the phone is checked once the purpose says it matters
    refusal = await refused(
        stack.gateway.RequestSmsCode(gateway_pb2.RequestSmsCodeRequest(phone="1381234567", purpose=SIGN_IN)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"phone"}
    refusal = await refused(
        stack.gateway.SignIn(gateway_pb2.SignInRequest(phone="x", challenge_id="", sms_code="1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"phone", "challenge_id", "sms_code"}

    session = await stack.register(ALICE)
    refusal = await refused(
        stack.gateway.SubmitQuery(
            gateway_pb2.SubmitQueryRequest(
                bank_codes=["ICBC", ""],
                challenge_id="z",
                sms_code="",
                face_token="",
                idempotency_key="has space",
            ),
            metadata=bearer(session.session_token),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {
        "bank_codes[1]",
        "challenge_id",
        "sms_code",
        "face_token",
        "idempotency_key",
    }
    refusal = await refused(
        stack.gateway.GetReport(
            gateway_pb2.GetReportRequest(query_id="", payment_password="abcdef"),
            metadata=bearer(session.session_token),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"query_id", "payment_password"}
    refusal = await refused(
        stack.gateway.WatchQuery(
            gateway_pb2.WatchQueryRequest(query_id="../etc"), metadata=bearer(session.session_token)
        ).read(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"query_id"}


async def test_unknown_bank_is_named(stack: Stack):
    session = await stack.register(ALICE)
    refusal = await refused(
        stack.submit(ALICE, session.session_token, bank_codes=["ICBC", "NOSUCHBANK"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_BANK",
    )
    assert refusal.metadata["bank_code"] == "NOSUCHBANK"
    assert refusal.violations == {"bank_codes[1]": "unknown bank code"}
    assert stack.reports.created == []


async def test_only_ascii_digits_and_whole_values_pass(stack: Stack):
    arabic = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
    fullwidth = str.maketrans("0123456789", "０１２３４５６７８９")
    # Each would be a second spelling of a valid value (or, for superscripts, crash a naive int()).
    request = stack.register_request(
        ALICE,
        "a" * 32 + "\n",
        "123456\n",
        name=ALICE.name + "\n",
        id_number=ALICE.id_number.translate(arabic),
        phone=ALICE.phone + "\n",
        card_number="²" * 16,
        payment_password=PASSWORD.translate(fullwidth),
    )
    refusal = await refused(
        stack.gateway.Register(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    assert set(refusal.violations) == {
        "name",
        "id_number",
        "phone",
        "card_number",
        "payment_password",
        "challenge_id",
        "sms_code",
    }
    refusal = await refused(
        stack.gateway.Register(
            stack.register_request(ALICE, "a" * 32, "123456", card_number=ALICE.card_number.translate(arabic))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"card_number"}
    # Card numbers: 16 to 19 digits with a Luhn check digit.
    for card, valid in [
        (complete_card_number("6" * 14), False),
        (complete_card_number("6" * 15), True),
        (complete_card_number("6" * 18), True),
        (complete_card_number("6" * 19), False),
    ]:
        from gateway.validation import Violations

        problems = Violations()
        problems.card_number(card)
        assert (not problems.items) == valid, card


async def test_an_undecodable_request_is_invalid_argument_on_every_rpc(stack: Stack):
    channel = stack.channels[0]
    for method in gateway_pb2.DESCRIPTOR.services_by_name["CardCheck"].methods:
        path = f"/cardcheck.v1.CardCheck/{method.name}"
        payloads = [b"\xff\xff\xff"]  # corrupt wire format
        first = method.input_type.fields_by_number.get(1)
        if first is not None and first.type == first.TYPE_STRING:
            payloads.append(b"\x0a\x02\xc3\x28")  # field 1 a string with bad UTF-8
        for payload in payloads:
            if method.server_streaming:
                call = channel.unary_stream(path)(payload).read()
            else:
                call = channel.unary_unary(path)(payload)
            refusal = await refused(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
            assert set(refusal.violations) == {"request"}, method.name
    await stack.gateway.GetAgreement(gateway_pb2.GetAgreementRequest())  # still serving


# --- request bounds ------------------------------------------------------------------------------


async def test_an_oversized_request_is_refused_before_it_is_parsed_and_the_next_is_served(stack: Stack):
    session = await stack.register(ALICE)
    junk = ["x" * 30] * 2000  # 64 KB: twice the gateway's 32 KiB
    for method, request in (
        (stack.gateway.SubmitQuery, gateway_pb2.SubmitQueryRequest(bank_codes=junk)),
        (stack.gateway.Register, gateway_pb2.RegisterRequest(name="张" * 20_000)),
        (stack.gateway.GetReport, gateway_pb2.GetReportRequest(query_id="q" * 40_000)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request, metadata=bearer(session.session_token))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        assert "larger than max" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.WatchQuery(
            gateway_pb2.WatchQueryRequest(query_id="q" * 40_000), metadata=bearer(session.session_token)
        ).read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stack.reports.created == []
    query = await stack.submit(ALICE, session.session_token)  # the owner's next call is served
    assert query.status == common_pb2.QUERY_STATUS_PENDING


async def test_junk_bank_codes_below_the_limit_are_counted_not_looked_at(stack: Stack):
    session = await stack.register(ALICE)

    def submit(bank_codes: list[str], face_token: str = "sandbox:pass"):
        return stack.gateway.SubmitQuery(
            gateway_pb2.SubmitQueryRequest(
                bank_codes=bank_codes, agreement_version=CURRENT.version, consent_given=True,
                challenge_id="a" * 32, sms_code="123456", face_token=face_token,
            ),
            metadata=bearer(session.session_token),
        )

    # 7,000 codes (28 KB, under the limit): one violation, about their number, none about each.
    refusal = await refused(submit(["!!"] * 7000), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert refusal.violations == {"bank_codes": "too many bank codes (7000; at most 96)"}
    # 96 bad codes (as many as may be named): the first 10 named, the rest counted.
    refusal = await refused(submit(["!!"] * 96, face_token=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert list(refusal.violations) == [f"bank_codes[{i}]" for i in range(10)]
    assert refusal.metadata == {"violations_omitted": "87"}  # 86 more codes and the face token
    # 96 unknown ones: UNKNOWN_BANK, as bounded.
    refusal = await refused(
        submit([f"NOSUCH{i}" for i in range(96)]), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_BANK"
    )
    assert len(refusal.violations) == 10 and refusal.metadata["violations_omitted"] == "86"
    assert all(len(value) <= 256 for value in refusal.metadata.values())
    assert stack.reports.created == []


async def test_huge_request_headers_are_refused(stack: Stack):
    session = await stack.register(ALICE)
    for size in (9000, 100_000, 1_000_000):  # the gateway takes 8 KiB of headers
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.gateway.ListQueries(
                gateway_pb2.ListQueriesRequest(), metadata=(("authorization", "Bearer " + "a" * size),)
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, caught.value)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.gateway.ListQueries(
                gateway_pb2.ListQueriesRequest(),
                metadata=(*bearer(session.session_token), ("x-junk", "j" * size)),
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, caught.value)
    await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(session.session_token))


async def test_the_receive_limit_can_be_set_back_to_grpcs_default(start_stack):
    stack = await start_stack(max_receive_bytes={"gateway": 4 * 1024 * 1024})
    session = await stack.register(ALICE)
    refusal = await refused(  # parsed now, and refused by validation
        stack.gateway.SubmitQuery(
            gateway_pb2.SubmitQueryRequest(bank_codes=["x" * 30] * 2000), metadata=bearer(session.session_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert refusal.violations["bank_codes"] == "too many bank codes (2000; at most 96)"


# --- the whole flow ----------------------------------------------------------------------------


async def test_register_sign_in_submit_watch_and_read_the_report(stack: Stack):
    client = stack.client
    banks = await client.list_banks()
    assert [b.code for b in banks] == list(BANK_CODES)
    assert {b.code for b in banks if not b.available} == {"GDRCC", "CQFMB"}
    assert all(b.name for b in banks)
    agreement = await client.get_agreement()
    assert agreement.version == CURRENT.version and agreement.title == "一键查卡服务授权协议"
    assert "7" in agreement.text and "银行" in agreement.text

    stack.bank.enrol(CAROL, "CMB")
    challenge = await client.request_sms_code("REGISTER", CAROL.phone)
    code = await stack.code_for(CAROL.phone)
    registered = await client.register(
        name=CAROL.name,
        id_number=CAROL.id_number.lower(),  # the check digit x in lower case is the same ID
        phone=CAROL.phone,
        challenge_id=challenge.challenge_id,
        sms_code=code,
        card_number=CAROL.card_number,
        payment_password=PASSWORD,
        region=CAROL.region,
    )
    assert registered.user_id and registered.session_token
    assert registered.expires_at.ToDatetime().replace(
        tzinfo=stack.clock.now().tzinfo
    ) == stack.clock.now() + timedelta(hours=24)
    verify = stack.bank.verify_calls[-1]
    assert (verify.card_number, verify.name, verify.id_number, verify.phone) == (
        CAROL.card_number,
        CAROL.name,
        CAROL.id_number,
        CAROL.phone,
    )

    # A second device signs in with an SMS code.
    stack.clock.advance(timedelta(minutes=2))
    other = CardCheckClient(channel=stack.channels[0])
    challenge = await other.request_sms_code("SIGN_IN", CAROL.phone)
    signed_in = await other.sign_in(
        phone=CAROL.phone, challenge_id=challenge.challenge_id, sms_code=await stack.code_for(CAROL.phone)
    )
    assert signed_in.user_id == registered.user_id
    assert signed_in.session_token != registered.session_token

    challenge = await other.request_sms_code("QUERY_AUTH")  # the registered phone gets it
    query = await other.submit_query(
        agreement_version=agreement.version,
        challenge_id=challenge.challenge_id,
        sms_code=await stack.code_for(CAROL.phone),
        face_token="sandbox:pass",
        idempotency_key="submit-1",
    )
    assert query.status == common_pb2.QUERY_STATUS_PENDING
    created = stack.reports.created[-1]
    assert created.user_id == registered.user_id
    assert (created.subject.name, created.subject.id_number, created.subject.phone) == (
        CAROL.name,
        CAROL.id_number,
        CAROL.phone,
    )
    # No bank named: every bank bank_connector says is available.
    assert list(created.bank_codes) == [c for c in BANK_CODES if c not in {"GDRCC", "CQFMB"}]
    assert created.agreement_version == CURRENT.version and created.idempotency_key == "submit-1"

    receipts = [m for m in await stack.inbox(CAROL.phone) if m.kind == "CONSENT_RECEIPT"]
    assert len(receipts) == 1 and CURRENT.version in receipts[0].body

    # The same idempotency key returns the same query, without asking report_service again.
    again = await other.submit_query(
        agreement_version=agreement.version,
        challenge_id=challenge.challenge_id,
        sms_code="000000",
        face_token="sandbox:pass",
        idempotency_key="submit-1",
    )
    assert again.query_id == query.query_id and len(stack.reports.created) == 1

    events = [event async for event in other.watch_query(query.query_id)]
    assert [e.query.status for e in events] == [
        common_pb2.QUERY_STATUS_PENDING,
        common_pb2.QUERY_STATUS_READY,
    ]
    # Progress only: the cards are shown by GetReport, behind the payment password.
    assert events[1].outcome.bank_code == "ICBC" and events[1].outcome.kind == common_pb2.BANK_OUTCOME_KIND_ANSWERED
    assert list(events[1].new_outcomes) == [events[1].outcome]
    assert not any(o.cards for o in (events[1].outcome, *events[1].outcomes, *events[1].new_outcomes))
    assert [q.query_id for q in await client.list_queries()] == [query.query_id]

    report = await client.get_report(query.query_id, PASSWORD)
    assert report.query_id == query.query_id and report.summary[0].bank_code == "ICBC"
    assert stack.reports.report_calls[-1].user_id == registered.user_id

    # Someone else's query is not found.
    bob = await stack.register(BOB)
    with pytest.raises(CardCheckError) as caught:
        await client.get_report(query.query_id, PASSWORD, session_token=bob.session_token)
    assert caught.value.reason == "NOT_FOUND"


async def test_named_banks_are_asked_deduplicated(stack: Stack):
    session = await stack.register(ALICE)
    await stack.submit(ALICE, session.session_token, bank_codes=["CMB", "ICBC", "CMB"])
    assert list(stack.reports.created[-1].bank_codes) == ["CMB", "ICBC"]


async def test_without_bank_connector_banks_are_listed_unavailable_and_all_are_asked(
    start_stack, stack: Stack
):
    session = await stack.register(ALICE)
    down = await start_stack(bank_connector="127.0.0.1:1")
    response = await down.gateway.ListBanks(gateway_pb2.ListBanksRequest())
    assert [b.code for b in response.banks] == list(BANK_CODES)
    assert not any(b.available for b in response.banks)
    # The same database: ALICE's session works on the second gateway too.
    await down.submit(ALICE, session.session_token)
    assert list(stack.reports.created[-1].bank_codes) == list(BANK_CODES)


async def test_queries_without_bank_codes_reuse_the_banks_available_for_a_second(stack: Stack):
    alice, bob = await stack.register(ALICE), await stack.register(BOB)
    await stack.submit(ALICE, alice.session_token)
    asked = list(stack.reports.created[-1].bank_codes)
    assert "GDRCC" not in asked and "CQFMB" not in asked and "ICBC" in asked
    stack.bank.unavailable = {"ICBC"}
    stack.clock.advance(timedelta(milliseconds=999))
    await stack.submit(BOB, bob.session_token)
    assert list(stack.reports.created[-1].bank_codes) == asked  # bank_connector's answer reused
    stack.clock.advance(timedelta(minutes=1))  # past the phone's one code a minute
    await stack.submit(ALICE, alice.session_token)
    assert list(stack.reports.created[-1].bank_codes) == [code for code in BANK_CODES if code != "ICBC"]


async def test_consent_receipt_failure_does_not_fail_the_query(stack: Stack):
    session = await stack.register(ALICE)
    challenge_id, code = await stack.query_auth(ALICE, session.session_token)
    await stack.notifier_host.stop(0)
    query = await stack.gateway.SubmitQuery(
        gateway_pb2.SubmitQueryRequest(
            agreement_version=CURRENT.version,
            consent_given=True,
            challenge_id=challenge_id,
            sms_code=code,
            face_token="sandbox:pass",
        ),
        metadata=bearer(session.session_token),
    )
    assert query.query_id and stack.reports.created[-1].idempotency_key  # one was generated


async def test_sms_code_not_sent_is_refused_as_unavailable(stack: Stack):
    await stack.notifier_host.stop(0)
    await refused(
        stack.gateway.RequestSmsCode(gateway_pb2.RequestSmsCodeRequest(phone=ALICE.phone, purpose=REGISTER)),
        grpc.StatusCode.UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
    )


# --- SMS challenges --------------------------------------------------------------------------


async def test_wrong_expired_and_reused_codes_fail_verification(stack: Stack):
    stack.bank.enrol(ALICE)
    challenge_id, code = await stack.challenge(REGISTER, ALICE.phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    await refused(
        stack.gateway.Register(stack.register_request(ALICE, challenge_id, wrong)),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )
    # The code of one phone does not register another.
    await refused(
        stack.gateway.Register(stack.register_request(ALICE, challenge_id, code, phone=BOB.phone)),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )
    # Expired after 5 minutes.
    stack.clock.advance(timedelta(minutes=5))
    await refused(
        stack.gateway.Register(stack.register_request(ALICE, challenge_id, code)),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )
    # A fresh code works once.
    challenge_id, code = await stack.challenge(REGISTER, ALICE.phone)
    stack.clock.advance(timedelta(minutes=4, seconds=59))
    await stack.gateway.Register(stack.register_request(ALICE, challenge_id, code))
    await refused(
        stack.gateway.SignIn(
            gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )  # a REGISTER code is not a SIGN_IN code
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    request = gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    await stack.gateway.SignIn(request)
    await refused(stack.gateway.SignIn(request), grpc.StatusCode.PERMISSION_DENIED, "VERIFICATION_FAILED")


async def test_five_wrong_tries_kill_a_challenge(stack: Stack):
    await stack.register(ALICE)
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        await refused(
            stack.gateway.SignIn(
                gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=wrong)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "VERIFICATION_FAILED",
        )
    await refused(
        stack.gateway.SignIn(
            gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )


async def test_four_wrong_tries_leave_the_challenge_alive(stack: Stack):
    await stack.register(ALICE)
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(4):
        await refused(
            stack.gateway.SignIn(
                gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=wrong)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "VERIFICATION_FAILED",
        )
    await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    )


async def test_sign_in_code_for_an_unknown_phone_answers_alike_but_sends_nothing(stack: Stack):
    challenge = await stack.gateway.RequestSmsCode(
        gateway_pb2.RequestSmsCodeRequest(phone=BOB.phone, purpose=SIGN_IN)
    )
    assert re.fullmatch(r"[0-9a-f]{32}", challenge.challenge_id)
    assert challenge.expires_in_seconds == 300 and challenge.resend_after_seconds == 60
    assert await stack.inbox(BOB.phone) == []
    await refused(
        stack.gateway.SignIn(
            gateway_pb2.SignInRequest(phone=BOB.phone, challenge_id=challenge.challenge_id, sms_code="123456")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )


class RefusingInbox(SandboxProvider):
    """The sandbox inbox, except that the SMS vendor refuses the phones in `refused` for good."""

    def __init__(self) -> None:
        self.refused: set[str] = set()

    async def deliver(self, sms: OutgoingSms) -> None:
        if sms.phone in self.refused:
            raise DeliveryError("HTTP_400", retryable=False)


async def test_a_code_the_sms_vendor_refuses_for_good_is_not_promised(start_stack):
    inbox = RefusingInbox()
    stack = await start_stack(sms_provider=inbox)
    session = await stack.register(ALICE)
    inbox.refused = {ALICE.phone, BOB.phone}

    # REGISTER: the caller typed the number, and hears at once that it cannot receive texts; the
    # challenge is withdrawn, so asking again is not held to the minute between codes.
    request = gateway_pb2.RequestSmsCodeRequest(phone=BOB.phone, purpose=REGISTER)
    for _ in range(2):
        refusal = await refused(stack.gateway.RequestSmsCode(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert set(refusal.violations) == {"phone"}
    # QUERY_AUTH: the account's own phone cannot be reached.
    await refused(
        stack.gateway.RequestSmsCode(gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=bearer(session.session_token)),
        grpc.StatusCode.UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
    )
    # SIGN_IN answers alike for a registered phone the vendor refuses and an unknown one.
    registered = await stack.gateway.RequestSmsCode(gateway_pb2.RequestSmsCodeRequest(phone=ALICE.phone, purpose=SIGN_IN))
    unknown = await stack.gateway.RequestSmsCode(gateway_pb2.RequestSmsCodeRequest(phone=CAROL.phone, purpose=SIGN_IN))
    assert (registered.expires_in_seconds, registered.resend_after_seconds) == (
        unknown.expires_in_seconds, unknown.resend_after_seconds
    )

    inbox.refused.clear()  # the number works again: its code arrives
    challenge_id, code = await stack.challenge(REGISTER, BOB.phone)
    assert challenge_id and re.fullmatch(r"\d{6}", code)


async def test_a_code_that_could_not_be_sent_does_not_count_towards_the_cap(start_stack):
    stack = await start_stack(config=GatewayConfig(sms_phone_daily_cap=1, sms_phone_daily_reserve=0))
    await stack.notifier_host.stop(0)
    request = gateway_pb2.RequestSmsCodeRequest(phone=ALICE.phone, purpose=REGISTER)
    # Nor towards the caller's escalating cooldown: asked again at once, refused the same way.
    await refused(stack.gateway.RequestSmsCode(request), grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    await refused(stack.gateway.RequestSmsCode(request), grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")


async def test_each_caller_is_limited_so_nobody_can_bomb_phones(start_stack):
    stack = await start_stack(
        config=GatewayConfig(sms_caller_burst=3, sms_caller_per_hour=6, caller_header="x-forwarded-for")
    )
    phones = [f"1390000000{i}" for i in range(5)]

    def from_(address: str) -> tuple[tuple[str, str]]:
        return (("x-forwarded-for", f"10.9.9.9, {address}"),)  # the proxy appended the last one

    for phone in phones[:3]:
        await stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(phone=phone, purpose=REGISTER), metadata=from_("203.0.113.7")
        )
    refusal = await refused(
        stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(phone=phones[3], purpose=REGISTER),
            metadata=from_("203.0.113.7"),
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert refusal.metadata["limit"] == "caller" and refusal.retry_after == timedelta(minutes=10)
    assert await stack.inbox(phones[3]) == []
    # Another caller is not held back; an IPv6 caller is one /64.
    await stack.gateway.RequestSmsCode(
        gateway_pb2.RequestSmsCodeRequest(phone=phones[3], purpose=REGISTER), metadata=from_("198.51.100.1")
    )
    for i, phone in enumerate(phones):
        stack.clock.advance(timedelta(minutes=1))
        call = stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(phone=phone, purpose=SIGN_IN), metadata=from_(f"2001:db8::{i}")
        )
        if i < 3:
            await call
        else:
            await refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


def test_caller_of():
    from gateway.servicer import caller_of

    assert caller_of("ipv4:203.0.113.7:51234", ()) == "203.0.113.7"
    assert caller_of("ipv6:[2001:db8:1:2:3:4:5:6]:443", ()) == "2001:db8:1:2::/64"
    assert caller_of("ipv6:%5B::ffff:192.0.2.1%5D:443", ()) == "192.0.2.1"
    assert caller_of("unix:/tmp/s", ()) == "unix:/tmp/s"
    # The header only counts when configured (a client could otherwise pick any identity).
    metadata = (("x-forwarded-for", "1.1.1.1, 203.0.113.9"),)
    assert caller_of("ipv4:10.0.0.1:1", metadata) == "10.0.0.1"
    assert caller_of("ipv4:10.0.0.1:1", metadata, "x-forwarded-for") == "203.0.113.9"
    # The proxy appends its own occurrence after whatever the client sent: the last one names
    # the caller, whatever the client put in an earlier one.
    twice = (("X-Forwarded-For", "198.51.100.250"), ("authorization", "x"), ("x-forwarded-for", "1.1.1.1, 203.0.113.9"))
    assert caller_of("ipv4:10.0.0.1:1", twice, "x-forwarded-for") == "203.0.113.9"
    assert caller_of("ipv4:10.0.0.1:1", (("x-forwarded-for", b"2001:db8::7"),) * 2, "x-forwarded-for") == (
        "2001:db8::/64"
    )


async def test_a_client_cannot_pick_its_caller_by_sending_the_header_first(start_stack):
    stack = await start_stack(config=GatewayConfig(sms_caller_burst=1, caller_header="x-forwarded-for"))
    proxy = ("x-forwarded-for", "203.0.113.7")  # what the proxy appends for this client
    await stack.gateway.RequestSmsCode(
        gateway_pb2.RequestSmsCodeRequest(phone=ALICE.phone, purpose=REGISTER),
        metadata=(("x-forwarded-for", "10.0.0.1"), proxy),
    )
    for forged in ("10.0.0.2", "198.51.100.1, 10.0.0.3"):
        refusal = await refused(
            stack.gateway.RequestSmsCode(
                gateway_pb2.RequestSmsCodeRequest(phone=BOB.phone, purpose=REGISTER),
                metadata=(("x-forwarded-for", forged), proxy),
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        assert refusal.metadata["limit"] == "caller"


async def test_each_user_is_limited_on_query_codes_and_report_attempts(start_stack):
    stack = await start_stack(config=GatewayConfig(sms_user_burst=1, report_user_burst=2))
    alice = await stack.register(ALICE)
    token = alice.session_token
    await stack.query_auth(ALICE, token)
    stack.clock.advance(timedelta(minutes=1))  # past the phone's one-a-minute
    query_auth = gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH)
    refusal = await refused(
        stack.gateway.RequestSmsCode(query_auth, metadata=bearer(token)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    # The session's own budget (the user's rate) answers first; another session of the same
    # user has a full one of its own, and meets the user's.
    assert refusal.metadata["limit"] == "session" and refusal.retry_after == timedelta(minutes=2)
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    second = await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    )
    refusal = await refused(
        stack.gateway.RequestSmsCode(query_auth, metadata=bearer(second.session_token)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert refusal.metadata["limit"] == "user" and refusal.retry_after == timedelta(minutes=2)
    # GetReport: every attempt counts, before the password is even looked at.
    request = gateway_pb2.GetReportRequest(query_id="q1", payment_password="000000")
    for _ in range(2):
        await refused(
            stack.gateway.GetReport(request, metadata=bearer(token)),
            grpc.StatusCode.PERMISSION_DENIED,
            "PAYMENT_PASSWORD_INVALID",
        )
    refusal = await refused(
        stack.gateway.GetReport(request, metadata=bearer(token)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert refusal.retry_after == timedelta(seconds=6)
    stack.clock.advance(timedelta(seconds=6))
    refusal = await refused(
        stack.gateway.GetReport(request, metadata=bearer(token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "PAYMENT_PASSWORD_INVALID",
    )
    assert refusal.metadata["attempts_left"] == "2"  # the refused attempt was not counted as wrong


# --- registration refusals ---------------------------------------------------------------------


async def test_one_account_per_id_number_and_per_phone(stack: Stack):
    await stack.register(ALICE)
    same_id = dataclasses.replace(ALICE, phone=BOB.phone)
    same_phone = dataclasses.replace(BOB, phone=ALICE.phone)
    stack.clock.advance(timedelta(minutes=1))
    for person in (same_id, same_phone):
        stack.bank.enrol(person)
        challenge_id, code = await stack.challenge(REGISTER, person.phone)
        await refused(
            stack.gateway.Register(stack.register_request(person, challenge_id, code)),
            grpc.StatusCode.ALREADY_EXISTS,
            "ALREADY_REGISTERED",
        )
    # The same ID with a lower-case check digit is the same person.
    carol = await stack.register(CAROL)
    assert carol.user_id
    lower = dataclasses.replace(CAROL, id_number=CAROL.id_number.lower(), phone="17700001111")
    stack.bank.enrol(lower)
    challenge_id, code = await stack.challenge(REGISTER, lower.phone)
    await refused(
        stack.gateway.Register(stack.register_request(lower, challenge_id, code)),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_REGISTERED",
    )


async def test_real_name_check_failure(stack: Stack):
    stack.bank.enrol(dataclasses.replace(ALICE, phone=BOB.phone))  # the bank holds another reserved phone
    challenge_id, code = await stack.challenge(REGISTER, ALICE.phone)
    await refused(
        stack.gateway.Register(stack.register_request(ALICE, challenge_id, code)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REAL_NAME_CHECK_FAILED",
    )
    assert stack.bank.verify_calls  # the bank was asked


@pytest.fixture
async def real_bank_connector(tmp_path: Path) -> AsyncIterator[tuple[str, bank_pb2_grpc.BankSimControlStub]]:
    """bank_sim (a small generated population) and bank_connector in-process on port 0, as the
    gateway reaches them in production: the connector's address and bank_sim's control stub."""
    addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
    addresses.update(bank_sim="127.0.0.1:0", bank_connector="127.0.0.1:0")
    settings = Settings(addresses=addresses, data_dir=tmp_path)
    sim = await build_bank_sim(
        settings, records=BANK_RECORDS,
        tracer_provider=make_tracer_provider("bank_sim", tmp_path, exporter=InMemorySpanExporter()),
    )
    sim_port = await sim.start()
    connector = await build_bank_connector(
        settings.replace(addresses={**addresses, "bank_sim": f"127.0.0.1:{sim_port}"}),
        tracer_provider=make_tracer_provider("bank_connector", tmp_path, exporter=InMemorySpanExporter()),
    )
    connector_port = await connector.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sim_port}")
    yield f"127.0.0.1:{connector_port}", bank_pb2_grpc.BankSimControlStub(channel)
    await channel.close()
    await connector.stop(0)
    await sim.stop(0)


async def verify_calls(control: bank_pb2_grpc.BankSimControlStub) -> dict[str, int]:
    state = await control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=5)
    return {bank.bank_code: bank.verify_calls for bank in state.banks}


async def test_register_with_a_card_no_supported_bank_issues_is_refused_on_card_number(
    start_stack, real_bank_connector
):
    address, control = real_bank_connector
    stack = await start_stack(bank_connector=address)
    holder = dataset.pick_demo_person(BANK_RECORDS)
    issuer = next(r.bank for r in BANK_RECORDS if r.pan == holder.card_number)
    person = Person(holder.name, holder.id_number, holder.phone, complete_card_number("623999444444444"), holder.region)
    before = await verify_calls(control)
    challenge_id, code = await stack.challenge(REGISTER, person.phone)
    refusal = await refused(
        stack.gateway.Register(stack.register_request(person, challenge_id, code)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert refusal.metadata == {"cause": "UNKNOWN_ISSUER"}
    assert refusal.violations == {"card_number": "no supported bank issues cards with this BIN"}
    assert await verify_calls(control) == before  # no bank was asked
    # Their own card registers them, asking its issuer alone.
    stack.clock.advance(timedelta(seconds=61))
    challenge_id, code = await stack.challenge(REGISTER, person.phone)
    await stack.gateway.Register(stack.register_request(person, challenge_id, code, card_number=holder.card_number))
    after = await verify_calls(control)
    assert {bank: after[bank] - before[bank] for bank in BANK_CODES if after[bank] != before[bank]} == {issuer: 1}


async def test_regions(start_stack, stack: Stack):
    session = await stack.register(ALICE)  # CN-JL, every region enabled
    restricted = await start_stack(enabled_regions=("CN-BJ", "CN-SH"))
    restricted.bank.enrol(BOB)
    challenge_id, code = await restricted.challenge(REGISTER, BOB.phone)
    refusal = await refused(
        restricted.gateway.Register(restricted.register_request(BOB, challenge_id, code, region="CN-JL")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REGION_NOT_SUPPORTED",
    )
    assert refusal.metadata["region"] == "CN-JL"
    # The challenge was not spent on a refusal that needed no code: it still registers BOB in Beijing.
    await restricted.gateway.Register(restricted.register_request(BOB, challenge_id, code, region="CN-BJ"))
    # A user registered where the service has since closed cannot query.
    await refused(
        restricted.submit(ALICE, session.session_token),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REGION_NOT_SUPPORTED",
    )


# --- query refusals ----------------------------------------------------------------------------


async def test_consent_is_required(stack: Stack):
    session = await stack.register(ALICE)
    token = session.session_token
    refusal = await refused(
        stack.submit(ALICE, token, consent_given=False),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONSENT_REQUIRED",
    )
    assert refusal.metadata["agreement_version"] == CURRENT.version
    stack.clock.advance(timedelta(minutes=1))
    await refused(
        stack.submit(ALICE, token, agreement_version="2020-01"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONSENT_REQUIRED",
    )
    assert stack.reports.created == []


async def test_wrong_face_token_fails_verification(stack: Stack):
    session = await stack.register(ALICE)
    await refused(
        stack.submit(ALICE, session.session_token, face_token="sandbox:fail"),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )
    assert stack.reports.created == []


async def test_query_auth_code_of_another_user_is_refused(stack: Stack):
    alice = await stack.register(ALICE)
    bob = await stack.register(BOB)
    challenge_id, code = await stack.query_auth(ALICE, alice.session_token)
    await refused(
        stack.gateway.SubmitQuery(
            gateway_pb2.SubmitQueryRequest(
                agreement_version=CURRENT.version,
                consent_given=True,
                challenge_id=challenge_id,
                sms_code=code,
                face_token="sandbox:pass",
            ),
            metadata=bearer(bob.session_token),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )


async def test_unauthenticated_calls(stack: Stack):
    session = await stack.register(ALICE)
    calls = {
        "no token": (),
        "unknown token": bearer("x" * 43),
        "not bearer": (("authorization", f"Basic {session.session_token}"),),
    }
    for metadata in calls.values():
        await refused(
            stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=metadata),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
        await refused(
            stack.gateway.RequestSmsCode(
                gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=metadata
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
        for call in (
            stack.gateway.SubmitQuery(gateway_pb2.SubmitQueryRequest(), metadata=metadata),
            stack.gateway.GetReport(gateway_pb2.GetReportRequest(), metadata=metadata),
            stack.gateway.WatchQuery(gateway_pb2.WatchQueryRequest(query_id="q1"), metadata=metadata).read(),
        ):
            await refused(call, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(session.session_token))
    # Sessions last 24 hours.
    stack.clock.advance(timedelta(hours=24))
    await refused(
        stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(session.session_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )


async def test_sign_out_revokes_the_session_and_everywhere_all_of_them(stack: Stack):
    first = await stack.register(ALICE)
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    second = await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    )
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    third = await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    )
    bob = await stack.register(BOB)
    list_queries = gateway_pb2.ListQueriesRequest()

    ended = await stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(first.session_token))
    assert ended.sessions_ended == 1
    for call in (
        stack.gateway.ListQueries(list_queries, metadata=bearer(first.session_token)),
        stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(first.session_token)),
        stack.gateway.SubmitQuery(gateway_pb2.SubmitQueryRequest(), metadata=bearer(first.session_token)),
        stack.gateway.GetReport(gateway_pb2.GetReportRequest(), metadata=bearer(first.session_token)),
        stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=bearer(first.session_token)
        ),
        stack.gateway.WatchQuery(
            gateway_pb2.WatchQueryRequest(query_id="q1"), metadata=bearer(first.session_token)
        ).read(),
    ):
        await refused(call, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    await stack.gateway.ListQueries(list_queries, metadata=bearer(second.session_token))

    # Everywhere: the caller's and every other session of the same user, not another user's.
    ended = await stack.gateway.SignOut(
        gateway_pb2.SignOutRequest(everywhere=True), metadata=bearer(third.session_token)
    )
    assert ended.sessions_ended == 2
    for token in (second.session_token, third.session_token):
        await refused(
            stack.gateway.ListQueries(list_queries, metadata=bearer(token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
    await stack.gateway.ListQueries(list_queries, metadata=bearer(bob.session_token))
    # The client helper forgets its token on sign-out.
    client = CardCheckClient(channel=stack.channels[0], session_token=bob.session_token)
    assert await client.sign_out() == 1 and client.session_token is None


async def test_session_tokens_are_signed_expiring_and_checked_before_the_database(stack: Stack):
    from cardcheck.runtime.keys import Keyring
    from gateway.sessions import SessionTokens

    session = await stack.register(ALICE)
    token = session.session_token
    version, session_id, user_id, expiry, signature = token.split(".")
    assert version == "v1" and user_id == session.user_id
    assert int(expiry) == int(session.expires_at.seconds)

    def flip(part: str) -> str:
        return part[:-1] + ("A" if part[-1] != "A" else "B")

    forged = [
        ".".join([version, session_id, user_id, str(int(expiry) + 3600), signature]),  # longer life
        ".".join([version, session_id, BOB_USER, expiry, signature]),  # someone else
        ".".join([version, flip(session_id), user_id, expiry, signature]),
        ".".join([version, session_id, user_id, expiry, flip(signature)]),
        ".".join([version, session_id, user_id, expiry]),
        token + ".x",
        token.replace("v1", "v2", 1),
        "x" * 300,
        "",
    ]
    # Signed with another key: well formed, authentic to nobody.
    other = SessionTokens.from_keyring(Keyring(b"k" * 32))
    forged.append(other.sign(session_id, user_id, session.expires_at.ToDatetime().replace(tzinfo=UTC)))
    for bad in forged:
        await refused(
            stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(bad)),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
    await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(token))

    # A forged token is refused by its signature alone: no database is consulted.
    class NoDatabase:
        async def run(self, work):
            raise AssertionError("the database was consulted")

    from gateway.sessions import Sessions

    keyring = Keyring(load_master_key(None, stack.settings.data_dir))
    offline = Sessions(NoDatabase(), keyring, stack.clock)  # type: ignore[arg-type]
    assert offline.verify(token).user_id == session.user_id
    for bad in [*forged, token + "é", None]:  # (metadata could not carry these two)
        with pytest.raises(CardCheckError) as caught:
            offline.verify(bad)
        assert caught.value.reason == "UNAUTHENTICATED"
    stack.clock.advance(timedelta(hours=24))
    with pytest.raises(CardCheckError, match="expired"):
        offline.verify(token)


async def test_payment_password_is_counted_and_locks(stack: Stack):
    session = await stack.register(ALICE)
    token = session.session_token
    query = await stack.submit(ALICE, token)
    request = gateway_pb2.GetReportRequest(query_id=query.query_id, payment_password="000000")
    # A wrong password, then the right one: the count starts again.
    await refused(
        stack.gateway.GetReport(request, metadata=bearer(token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "PAYMENT_PASSWORD_INVALID",
    )
    right = gateway_pb2.GetReportRequest(query_id=query.query_id, payment_password=PASSWORD)
    await stack.gateway.GetReport(right, metadata=bearer(token))
    for attempt in range(1, 5):
        refusal = await refused(
            stack.gateway.GetReport(request, metadata=bearer(token)),
            grpc.StatusCode.PERMISSION_DENIED,
            "PAYMENT_PASSWORD_INVALID",
        )
        assert refusal.metadata["attempts_left"] == str(5 - attempt)
    refusal = await refused(
        stack.gateway.GetReport(request, metadata=bearer(token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "PAYMENT_PASSWORD_LOCKED",
    )
    assert refusal.retry_after == timedelta(minutes=30)
    calls = len(stack.reports.report_calls)
    stack.clock.advance(timedelta(minutes=29))
    refusal = await refused(
        stack.gateway.GetReport(right, metadata=bearer(token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "PAYMENT_PASSWORD_LOCKED",
    )
    assert refusal.retry_after == timedelta(minutes=1)
    assert len(stack.reports.report_calls) == calls  # no report while locked
    stack.clock.advance(timedelta(minutes=1))
    await stack.gateway.GetReport(right, metadata=bearer(token))


# --- load shedding and relayed refusals ---------------------------------------------------------


async def test_global_admission_limit_sheds_load(start_stack):
    stack = await start_stack(config=GatewayConfig(submit_global_rps=0.5, submit_global_burst=1))
    alice = await stack.register(ALICE)
    bob = await stack.register(BOB)
    await stack.submit(ALICE, alice.session_token)
    refusal = await refused(
        stack.submit(BOB, bob.session_token), grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVICE_BUSY"
    )
    assert refusal.retry_after == timedelta(seconds=2)
    stack.clock.advance(timedelta(minutes=1))  # and a new code may be asked for
    await stack.submit(BOB, bob.session_token)


async def test_shedding_comes_before_the_database_and_after_the_signature(start_stack):
    stack = await start_stack(config=GatewayConfig(submit_global_rps=0.001, submit_global_burst=1))
    alice = await stack.register(ALICE)
    await stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(alice.session_token))
    empty = gateway_pb2.SubmitQueryRequest()
    # The one admission goes to a revoked token (refused by the database check behind it)...
    await refused(
        stack.gateway.SubmitQuery(empty, metadata=bearer(alice.session_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    # ...then the limit answers before the database would have: busy, not unauthenticated.
    refusal = await refused(
        stack.gateway.SubmitQuery(empty, metadata=bearer(alice.session_token)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SERVICE_BUSY",
    )
    assert refusal.retry_after is not None and refusal.retry_after > timedelta(0)
    # A token that is not ours never reaches the limit.
    for metadata in ((), bearer("x" * 43)):
        await refused(
            stack.gateway.SubmitQuery(empty, metadata=metadata),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )


async def test_while_shedding_refused_calls_are_not_traced_one_by_one(start_stack):
    import time

    from opentelemetry.trace import SpanKind

    stack = await start_stack(
        config=GatewayConfig(submit_global_rps=0.001, submit_global_burst=1, submit_user_burst=100)
    )
    alice = await stack.register(ALICE)
    await stack.submit(ALICE, alice.session_token)
    started = time.monotonic()
    for _ in range(20):
        await refused(
            stack.gateway.SubmitQuery(gateway_pb2.SubmitQueryRequest(), metadata=bearer(alice.session_token)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SERVICE_BUSY",
        )
    elapsed = time.monotonic() - started
    submits = [
        span
        for span in stack.spans.get_finished_spans()
        if span.kind == SpanKind.SERVER and span.name.endswith("CardCheck/SubmitQuery")
    ]
    # The admitted one, the first refusal (shedding had not begun when it started), then at most
    # one a second; the refusals that are kept say so.
    assert 2 <= len(submits) <= 3 + elapsed, (len(submits), elapsed)
    assert [s.attributes.get("cardcheck.admission.shed") for s in submits[1:]] == [True] * (len(submits) - 1)
    # Other calls are traced as ever.
    before = len(stack.spans.get_finished_spans())
    await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(alice.session_token))
    assert len(stack.spans.get_finished_spans()) > before


def test_shedding_sampler():
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision

    from gateway.tracing import Shedding, SheddingSampler

    now = [0.0]
    shedding = Shedding(hold_s=1.0, monotonic=lambda: now[0])
    sampler = SheddingSampler(ALWAYS_ON, shedding, per_second=1.0, monotonic=lambda: now[0])
    submit, other = "/cardcheck.v1.CardCheck/SubmitQuery", "/cardcheck.v1.CardCheck/ListQueries"

    def decisions(name: str, n: int) -> list[bool]:
        return [sampler.should_sample(None, 1, name).decision == Decision.RECORD_AND_SAMPLE for _ in range(n)]

    assert decisions(submit, 5) == [True] * 5  # not shedding: the configured sampler decides
    shedding.shed()
    assert decisions(submit, 5) == [True, False, False, False, False]
    assert decisions(other, 3) == [True] * 3
    now[0] += 0.5
    shedding.shed()
    assert decisions(submit, 2) == [False, False]
    now[0] += 0.5
    assert decisions(submit, 2) == [True, False]  # one a second
    now[0] += 1.5  # no refusal for longer than the hold: no longer shedding
    assert decisions(submit, 3) == [True] * 3
    assert "SheddingSampler" in sampler.get_description()


async def test_each_user_is_rate_limited_on_submissions(start_stack):
    stack = await start_stack(config=GatewayConfig(submit_user_per_minute=1, submit_user_burst=2))
    alice = await stack.register(ALICE)
    bob = await stack.register(BOB)
    empty = gateway_pb2.SubmitQueryRequest()
    # Admission comes before any other check: even refused submissions count.
    for _ in range(2):
        await refused(
            stack.gateway.SubmitQuery(empty, metadata=bearer(alice.session_token)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
    refusal = await refused(
        stack.gateway.SubmitQuery(empty, metadata=bearer(alice.session_token)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert refusal.retry_after == timedelta(minutes=1)
    # Another user is not held back.
    await refused(
        stack.gateway.SubmitQuery(empty, metadata=bearer(bob.session_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    stack.clock.advance(timedelta(minutes=1))
    await stack.submit(ALICE, alice.session_token)


async def test_report_service_refusals_are_relayed_unchanged(stack: Stack):
    session = await stack.register(ALICE)
    stack.reports.refusal = CardCheckError("QUERY_IN_PROGRESS", metadata={"query_id": "q-pending"})
    refusal = await refused(
        stack.submit(ALICE, session.session_token), grpc.StatusCode.ALREADY_EXISTS, "QUERY_IN_PROGRESS"
    )
    assert refusal.metadata == {"query_id": "q-pending"}
    stack.clock.advance(timedelta(minutes=1))
    stack.reports.refusal = CardCheckError(
        "COOLDOWN_ACTIVE", metadata={"retry_after": "2026-01-12T09:00:00Z"}, retry_after=timedelta(days=6)
    )
    refusal = await refused(
        stack.submit(ALICE, session.session_token), grpc.StatusCode.FAILED_PRECONDITION, "COOLDOWN_ACTIVE"
    )
    assert refusal.metadata["retry_after"] == "2026-01-12T09:00:00Z" and refusal.retry_after == timedelta(
        days=6
    )
    assert [m.kind for m in await stack.inbox(ALICE.phone)].count("CONSENT_RECEIPT") == 0


# --- what is kept and what is told -------------------------------------------------------------


async def test_storage_spans_and_logs_hold_no_personal_data(stack: Stack, caplog):
    caplog.set_level("DEBUG")
    session = await stack.register(ALICE)
    query = await stack.submit(ALICE, session.session_token)
    await stack.gateway.GetReport(
        gateway_pb2.GetReportRequest(query_id=query.query_id, payment_password=PASSWORD),
        metadata=bearer(session.session_token),
    )
    secrets_ = [ALICE.name, ALICE.id_number, ALICE.phone, ALICE.card_number, PASSWORD, session.session_token]
    codes = [
        re.search(r"\d{6}", m.body).group(0) for m in await stack.inbox(ALICE.phone) if m.kind == "SMS_CODE"
    ]

    engine = make_engine(stack.settings.database_url, stack.settings.data_dir, "gateway")
    try:
        with engine.connect() as conn:
            tables = [t for t in inspect(conn).get_table_names() if t.startswith("gw_")]
            assert {"gw_users", "gw_sms_challenges", "gw_sessions"} <= set(tables)
            dump = ""
            for table in tables:
                for row in conn.execute(text(f"SELECT * FROM {table}")):
                    dump += " ".join(v.hex() if isinstance(v, bytes) else str(v) for v in row) + "\n"
    finally:
        engine.dispose()
    assert session.user_id in dump  # the rows are there
    for value in [*secrets_, *codes, ALICE.phone[-8:], ALICE.id_number[:14]]:
        assert value not in dump
    assert ALICE.name.encode().hex() not in dump

    span_text = ""
    for span in stack.spans.get_finished_spans():
        span_text += span.to_json()
    assert "CardCheck/SubmitQuery" in span_text
    assert (
        '"cardcheck.query.bank_count": 22' in span_text
        and '"cardcheck.sms.purpose": "QUERY_AUTH"' in span_text
    )
    for value in [*secrets_, *codes]:
        assert value not in span_text
    log_text = caplog.text
    assert "registered user" in log_text
    for value in [*secrets_, *codes]:
        assert value not in log_text


def test_bad_gateway_settings_fail_fast(tmp_path: Path):
    from cardcheck.runtime.settings import SettingsError

    with pytest.raises(SettingsError, match="CARDCHECK_SUBMIT_GLOBAL_RPS"):
        GatewayConfig.from_env({"CARDCHECK_SUBMIT_GLOBAL_RPS": "lots"})
    with pytest.raises(SettingsError, match="CARDCHECK_PAYMENT_PASSWORD_MAX_ATTEMPTS"):
        GatewayConfig.from_env({"CARDCHECK_PAYMENT_PASSWORD_MAX_ATTEMPTS": "0"})
    config = GatewayConfig.from_env(
        {"CARDCHECK_SUBMIT_GLOBAL_RPS": "5", "CARDCHECK_PAYMENT_PASSWORD_LOCK_MINUTES": "10"}
    )
    assert config.submit_global_rps == 5 and config.payment_password_lock == timedelta(minutes=10)
    env = {**os.environ, "CARDCHECK_SUBMIT_GLOBAL_BURST": "-1", "CARDCHECK_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "CARDCHECK_SUBMIT_GLOBAL_BURST" in result.stderr


async def test_token_bucket():
    from gateway.limits import TokenBucketLimiter

    clock = ManualClock()
    limiter = TokenBucketLimiter(rate=1.0, burst=2, clock=clock)
    assert await limiter.acquire("a") is None
    assert await limiter.acquire("a") is None
    assert await limiter.acquire("a") == timedelta(seconds=1)
    assert await limiter.acquire("b") is None  # keys are separate
    clock.advance(timedelta(milliseconds=500))
    assert await limiter.acquire("a") == timedelta(milliseconds=500)
    clock.advance(timedelta(milliseconds=500))
    assert await limiter.acquire("a") is None
    # Idle buckets are dropped when there are too many keys.
    small = TokenBucketLimiter(rate=1.0, burst=1, clock=clock, max_keys=2)
    for key in "xyz":
        await small.acquire(key)
        clock.advance(timedelta(seconds=2))
    assert len(small._buckets) <= 2


async def test_process_serves_health_and_reflection_and_stops_on_sigterm(tmp_path: Path):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    process = ServiceProcess("gateway", tmp_path, health_service="cardcheck.v1.CardCheck")
    await process.start()  # health says SERVING for cardcheck.v1.CardCheck
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            services = [s.name async for r in responses for s in r.list_services_response.service]
            assert "cardcheck.v1.CardCheck" in services
            # GetAgreement needs no other service.
            agreement = await gateway_pb2_grpc.CardCheckStub(channel).GetAgreement(
                gateway_pb2.GetAgreementRequest()
            )
            assert agreement.version == CURRENT.version
        assert await process.terminate() == 0
    finally:
        await process.stop()
    assert "gateway stopped" in process.output()


async def test_housekeeping_deletes_spent_challenges_and_expired_sessions(stack: Stack):
    from cardcheck.runtime.database import Database
    from cardcheck.runtime.keys import Keyring
    from gateway.challenges import Challenges
    from gateway.sessions import Sessions

    await stack.register(ALICE)
    db = Database(make_engine(stack.settings.database_url, stack.settings.data_dir, "gateway"))
    keyring = Keyring(load_master_key(None, stack.settings.data_dir))
    try:
        challenges = Challenges(db, keyring, stack.clock)
        sessions = Sessions(db, keyring, stack.clock)
        assert await challenges.purge_expired() == 0 and await sessions.purge_expired() == 0
        stack.clock.advance(timedelta(days=2, minutes=5))
        assert await challenges.purge_expired() == 1
        assert await sessions.purge_expired() == 1
        with db.session() as session:
            counts = [
                session.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                for t in (
                    "gw_sms_challenges", "gw_sms_throttle", "gw_sms_daily", "gw_sessions", "gw_users",
                    "gw_sms_escalation",
                )
            ]
        # The registering caller's proof of the phone is kept while it counts (30 days).
        assert counts == [0, 0, 0, 0, 1, 1]
        stack.clock.advance(timedelta(days=28))
        await challenges.purge_expired()
        with db.session() as session:
            assert session.execute(text("SELECT COUNT(*) FROM gw_sms_escalation")).scalar_one() == 0
    finally:
        db.dispose()


def test_sms_resend_interval_is_configurable() -> None:
    assert GatewayConfig.from_env({}).sms_resend_after == timedelta(seconds=60)
    assert GatewayConfig.from_env({"CARDCHECK_SMS_RESEND_S": "5"}).sms_resend_after == timedelta(seconds=5)


async def test_a_signed_in_users_query_and_report_open_no_orm_session(stack: Stack, monkeypatch):
    """The QUERY_AUTH code, SubmitQuery and a right GetReport read and write through Core
    statements alone: none of their units pays for an ORM Session."""
    session = await stack.register(ALICE)
    assert stack.flows is not None
    db = stack.flows._db
    with_session: list[object] = []
    run = db.run

    async def counted(work):
        with_session.append(work)
        return await run(work)

    monkeypatch.setattr(db, "run", counted)
    query = await stack.submit(ALICE, session.session_token)
    report = await stack.gateway.GetReport(
        gateway_pb2.GetReportRequest(query_id=query.query_id, payment_password=PASSWORD),
        metadata=bearer(session.session_token),
    )
    assert report.query_id == query.query_id
    assert with_session == []


async def test_the_statements_and_transactions_of_a_signed_in_users_journey(stack: Stack):
    """What each call of a journey asks of the gateway's database, pinned: the revocation check
    reads the user's row (and a SubmitQuery's earlier query of its key) in the same statement,
    a QUERY_AUTH code's resend mark is one upsert, its right code is consumed by one update and
    a new submission is one insert."""
    session = await stack.register(ALICE)
    assert stack.flows is not None
    engine = stack.flows._db.engine
    statements: list[str] = []
    transactions: list[object] = []

    def statement(conn, cursor, sql, params, context, executemany) -> None:
        statements.append(sql.split()[0])

    def begun(conn) -> None:
        transactions.append(conn)

    def asked(call: str) -> tuple[str, str, int]:
        """The call's statements (their first word) and how many transactions they ran in."""
        seen = (call, " ".join(statements), len(transactions))
        statements.clear()
        transactions.clear()
        return seen

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "begin", begun)
    try:
        known = await stack.message_ids(ALICE.phone)
        challenge = await stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=bearer(session.session_token)
        )
        sms = asked("RequestSmsCode")
        code = await stack.code_for(ALICE.phone, known=known)
        request = gateway_pb2.SubmitQueryRequest(
            agreement_version=CURRENT.version, consent_given=True, challenge_id=challenge.challenge_id,
            sms_code=code, face_token="sandbox:pass", idempotency_key="journey-1",
        )
        query = await stack.gateway.SubmitQuery(request, metadata=bearer(session.session_token))
        submit = asked("SubmitQuery")
        again = await stack.gateway.SubmitQuery(request, metadata=bearer(session.session_token))
        retry = asked("SubmitQuery again")
        report = await stack.gateway.GetReport(
            gateway_pb2.GetReportRequest(query_id=query.query_id, payment_password=PASSWORD),
            metadata=bearer(session.session_token),
        )
        view = asked("GetReport")
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "begin", begun)
    assert again.query_id == query.query_id and report.query_id == query.query_id
    assert [sms, submit, retry, view] == [
        ("RequestSmsCode", "SELECT INSERT INSERT", 2),
        ("SubmitQuery", "SELECT UPDATE INSERT", 3),
        ("SubmitQuery again", "SELECT", 1),
        ("GetReport", "SELECT", 1),
    ]
