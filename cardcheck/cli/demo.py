"""`cardcheck demo`: the whole user journey through the gateway, as a client would walk it,
printed as readable tables. Exits 0 only if every step succeeded."""

from __future__ import annotations

import asyncio
import re
import unicodedata
from datetime import timedelta
from pathlib import Path

import grpc

from cardcheck import dataset
from cardcheck.banks import BY_CODE
from cardcheck.runtime.errors import CardCheckError, Reason, from_rpc_error
from cardcheck.runtime.logs import mask_phone
from cardcheck.runtime.security import operator_channel
from cardcheck.runtime.settings import Settings
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, notifier_pb2, notifier_pb2_grpc

MAX_WAIT = timedelta(minutes=2)
SMS_CODE = re.compile(r"(?<!\d)\d{6}(?!\d)")
STATUS = {v.number: v.name.removeprefix("QUERY_STATUS_") for v in common_pb2.QueryStatus.DESCRIPTOR.values}
OUTCOME = {
    v.number: v.name.removeprefix("BANK_OUTCOME_KIND_") for v in common_pb2.BankOutcomeKind.DESCRIPTOR.values
}


class JourneyFailed(Exception):
    pass


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (w - _width(c)) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


class Journey:
    def __init__(self, settings: Settings, person: dataset.Person, payment_password: str) -> None:
        self.person = person
        self.payment_password = payment_password
        self.gateway_channel = operator_channel(settings, "gateway")
        self.notifier_channel = operator_channel(settings, "notifier")  # the sandbox's SMS inbox
        self.gateway = gateway_pb2_grpc.CardCheckStub(self.gateway_channel)
        self.inbox = notifier_pb2_grpc.NotifierStub(self.notifier_channel)
        self.metadata: tuple[tuple[str, str], ...] = ()

    async def close(self) -> None:
        await self.gateway_channel.close()
        await self.notifier_channel.close()

    async def call(self, method, request, **kwargs):
        try:
            return await method(request, metadata=self.metadata, timeout=30, **kwargs)
        except grpc.aio.AioRpcError as error:
            typed = from_rpc_error(error)
            if typed is None:
                raise JourneyFailed(f"{error.code().name}: {error.details()}") from None
            raise typed from None

    async def read_code(self, challenge_id: str, known: set[str]) -> str:
        """The newest code SMS in the sandbox inbox that was not there before the request."""
        for _ in range(100):
            reply = await self.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=self.person.phone))
            for message in reply.messages:
                if message.kind == "SMS_CODE" and message.message_id not in known:
                    code = SMS_CODE.search(message.body)
                    if code is None:
                        raise JourneyFailed(f"no 6-digit code in SMS {message.message_id}")
                    return code.group()
            await asyncio.sleep(0.1)
        raise JourneyFailed(f"no code SMS arrived for challenge {challenge_id}")

    async def inbox_ids(self) -> set[str]:
        reply = await self.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=self.person.phone))
        return {m.message_id for m in reply.messages}

    async def sms_code(self, purpose: common_pb2.SmsPurpose.ValueType) -> tuple[str, str]:
        known = await self.inbox_ids()
        request = gateway_pb2.RequestSmsCodeRequest(phone=self.person.phone, purpose=purpose)
        try:
            challenge = await self.call(self.gateway.RequestSmsCode, request)
        except CardCheckError as error:
            # A client honours RetryInfo: a code went to this phone moments ago (an earlier run).
            if error.reason != Reason.RATE_LIMITED or error.retry_after is None or error.retry_after > MAX_WAIT:
                raise
            print(f"{error.message_zh}: waiting {error.retry_after.total_seconds():.0f} s as the service asks")
            await asyncio.sleep(error.retry_after.total_seconds() + 0.5)
            challenge = await self.call(self.gateway.RequestSmsCode, request)
        code = await self.read_code(challenge.challenge_id, known)
        return challenge.challenge_id, code


async def walk(journey: Journey) -> common_pb2.Report:
    person = journey.person
    gw = journey.gateway

    step(1, "ListBanks: the banks that can be asked")
    banks = await journey.call(gw.ListBanks, gateway_pb2.ListBanksRequest())
    print(
        table(
            ["code", "银行", "类型", "可查询"],
            [
                [b.code, b.name, "全国性" if b.kind == common_pb2.BANK_KIND_NATIONAL else "区域性",
                 "是" if b.available else "否"]
                for b in banks.banks
            ],
        )
    )

    step(2, "GetAgreement: the consent the user accepts")
    agreement = await journey.call(gw.GetAgreement, gateway_pb2.GetAgreementRequest())
    print(f"《{agreement.title}》 version {agreement.version}, {len(agreement.text)} characters")

    print(f"\nThe user: {person.name[0]}** , phone {mask_phone(person.phone)}, region {person.region}")
    step(3, "RequestSmsCode(REGISTER) and Register with a bound card (real-name check by its bank)")
    challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_REGISTER)
    print(f"code SMS read from the sandbox inbox (challenge {challenge_id})")
    try:
        session = await journey.call(
            gw.Register,
            gateway_pb2.RegisterRequest(
                name=person.name, id_number=person.id_number, phone=person.phone, challenge_id=challenge_id,
                sms_code=code, card_number=person.card_number, payment_password=journey.payment_password,
                region=person.region,
            ),
        )
        print(f"registered: user {session.user_id}")
    except CardCheckError as error:
        if error.reason != Reason.ALREADY_REGISTERED:
            raise
        print("already registered on this mesh: signing in instead")
        challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_SIGN_IN)
        session = await journey.call(
            gw.SignIn, gateway_pb2.SignInRequest(phone=person.phone, challenge_id=challenge_id, sms_code=code)
        )
        print(f"signed in: user {session.user_id}")
    journey.metadata = (("authorization", f"Bearer {session.session_token}"),)

    step(4, "RequestSmsCode(QUERY_AUTH) and SubmitQuery (consent, SMS code, face check)")
    challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_QUERY_AUTH)
    known = await journey.inbox_ids()
    # The app would run the vendor's liveness check with this token; the sandbox's passes as it is.
    face = await journey.call(gw.StartFaceCheck, gateway_pb2.StartFaceCheckRequest())
    try:
        query = await journey.call(
            gw.SubmitQuery,
            gateway_pb2.SubmitQueryRequest(
                agreement_version=agreement.version, consent_given=True, challenge_id=challenge_id,
                sms_code=code, face_token=face.biz_token,
            ),
        )
    except CardCheckError as error:
        if error.reason != Reason.COOLDOWN_ACTIVE:
            raise
        print(f"{error.message_zh} (allowed again at {error.metadata.get('retry_after')}); showing the last report")
        queries = await journey.call(gw.ListQueries, gateway_pb2.ListQueriesRequest())
        query = next((q for q in queries.queries if q.status == common_pb2.QUERY_STATUS_READY), None)
        if query is None:
            raise
        return await show_report(journey, query.query_id)
    print(f"query {query.query_id} accepted: {STATUS[query.status]}, {query.banks_total} banks, "
          f"ready by {query.ready_by.ToDatetime():%Y-%m-%d %H:%M} UTC")

    step(5, "WatchQuery: each bank's outcome as it arrives")
    stream = gw.WatchQuery(gateway_pb2.WatchQueryRequest(query_id=query.query_id), metadata=journey.metadata,
                           timeout=120)
    try:
        first = True
        async for event in stream:
            # The first event tells the state so far; each later one the outcomes recorded together.
            for o in event.outcomes if first else event.new_outcomes:
                name = BY_CODE[o.bank_code].name
                print(f"  {o.bank_code:<8} {name}{' ' * (18 - _width(name))}{OUTCOME[o.kind]:<9} "
                      f"[{event.query.banks_answered}/{event.query.banks_total}]")
            first = False
            final = event.query
    except grpc.aio.AioRpcError as error:
        raise (from_rpc_error(error) or JourneyFailed(error.details())) from None
    print(f"query is {STATUS[final.status]}")
    if final.status != common_pb2.QUERY_STATUS_READY:
        raise JourneyFailed(f"query ended {STATUS[final.status]}")

    step(6, "The \"report ready\" SMS")
    for _ in range(100):
        reply = await journey.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=person.phone))
        ready = [m for m in reply.messages if m.kind == "REPORT_READY" and m.message_id not in known]
        if ready:
            print(f"  {ready[0].body}")
            break
        await asyncio.sleep(0.1)
    else:
        raise JourneyFailed("no report-ready SMS arrived")

    step(7, "ListQueries")
    queries = await journey.call(gw.ListQueries, gateway_pb2.ListQueriesRequest())
    print(table(["query", "status", "banks", "submitted (UTC)"], [
        [q.query_id, STATUS[q.status], f"{q.banks_answered}/{q.banks_total}",
         f"{q.submitted_at.ToDatetime():%Y-%m-%d %H:%M}"] for q in queries.queries
    ]))
    if queries.queries[0].query_id != query.query_id or queries.queries[0].status != common_pb2.QUERY_STATUS_READY:
        raise JourneyFailed("ListQueries does not show the query READY, newest first")
    return await show_report(journey, query.query_id)


async def show_report(journey: Journey, query_id: str) -> common_pb2.Report:
    step(8, "GetReport with the payment password")
    report = await journey.call(
        journey.gateway.GetReport,
        gateway_pb2.GetReportRequest(query_id=query_id, payment_password=journey.payment_password),
    )
    print(f"一键查卡报告  生成于 {report.generated_at.ToDatetime():%Y-%m-%d %H:%M} UTC, "
          f"保留至 {report.expires_at.ToDatetime():%Y-%m-%d %H:%M} UTC\n")
    total_debit = sum(s.debit_count for s in report.summary)
    total_credit = sum(s.credit_count for s in report.summary)
    print(table(["银行", "借记卡", "信用卡"], [
        [s.bank_name, str(s.debit_count), str(s.credit_count)] for s in report.summary if s.debit_count or s.credit_count
    ] + [["合计", str(total_debit), str(total_credit)]]))
    empty = [s.bank_name for s in report.summary if not (s.debit_count or s.credit_count)]
    if empty:
        print(f"\n未查询到卡片的银行（{len(empty)}家）：{'、'.join(empty)}")
    print()
    print(table(["银行", "卡种", "卡号"], [
        [c.bank_name, "借记卡" if c.card_type == common_pb2.CARD_TYPE_DEBIT else "信用卡",
         f"{c.first4} **** **** {c.last4}"] for c in report.cards
    ]))
    if report.unavailable_banks:
        print("\n暂未返回结果的银行：" + "、".join(
            f"{BY_CODE[u.bank_code].name}（{u.reason}）" for u in report.unavailable_banks))
    print(f"\n{report.notice}")
    return report


async def run_demo(dataset_path: Path | None, payment_password: str) -> int:
    settings = Settings.from_env()
    if dataset_path is not None:
        records = dataset.load(dataset_path)
    else:
        records = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
    journey = Journey(settings, dataset.pick_demo_person(records), payment_password)
    try:
        await walk(journey)
    except CardCheckError as error:
        print(f"\ndemo failed: {error.reason}: {error.message_zh} ({error.message})")
        return 1
    except (JourneyFailed, grpc.aio.AioRpcError) as error:
        print(f"\ndemo failed: {error}")
        return 1
    finally:
        await journey.close()
    print("\ndemo: the whole journey succeeded")
    return 0
