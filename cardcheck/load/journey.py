"""One journey through the public API, as a user's phone would walk it, each stage timed.

`sms_code` runs from RequestSmsCode to the code read from the inbox, `register` and `sign_in`
are their RPC alone, `submit` is SubmitQuery, `ready` from SubmitQuery's answer to the
WatchQuery event that shows the query READY, `report` is GetReport, and `journey` runs from
the journey's scheduled start to its last answer. A refusal ends the journey and is counted by
its reason, against the stage that met it; nothing is retried (an open-loop test measures what
arrivals get, not what persistence gets)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from cardcheck.client import CardCheckClient
from cardcheck.load.inbox import Inbox
from cardcheck.load.mix import JourneyKind
from cardcheck.load.recording import Recorder
from cardcheck.load.users import User, failure_reason
from cardcheck.v1 import common_pb2

FACE_TOKEN = "sandbox:pass"  # the sandbox identity's passing face check


class QueryNotReady(Exception):
    def __init__(self, status: common_pb2.QueryStatus.ValueType) -> None:
        self.reason = "QUERY_" + common_pb2.QueryStatus.Name(status).removeprefix("QUERY_STATUS_")
        super().__init__(self.reason)


class Target:
    """The gateway over a few connections, spread journey by journey: one connection carries at
    most the server's streams per connection (128 on the gateway) at once, and a real
    population comes over many."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], rpc_timeout_s: float) -> None:
        self.channels = list(channels)
        self._next = itertools.cycle(self.channels)
        self.rpc_timeout_s = rpc_timeout_s

    def client(self) -> CardCheckClient:
        return CardCheckClient(channel=next(self._next), timeout=self.rpc_timeout_s)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


@dataclass
class Journeys:
    target: Target
    inbox: Inbox
    recorder: Recorder
    agreement_version: str
    timeout_s: float

    async def run(self, kind: JourneyKind, user: User, scheduled: float) -> None:
        loop = asyncio.get_running_loop()
        stage = ["sms_code"]  # the stage under way, for the error's account
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._stages(kind, user, stage)
        except Exception as error:  # noqa: BLE001 - every failure is counted, none ends the run
            self.recorder.error(
                failure_reason(error), stage[0], loop.time(), getattr(error, "retry_after", None),
                (getattr(error, "metadata", None) or {}).get("limit"),
            )
        else:
            self.recorder.record("journey", scheduled, loop.time())

    async def _code(self, client: CardCheckClient, purpose: str, user: User, token: str | None, stage: list[str]):
        loop = asyncio.get_running_loop()
        stage[0] = "sms_code"
        began = loop.time()
        challenge = await client.request_sms_code(purpose, phone=user.phone, session_token=token)
        code = await self.inbox.next_code(user.phone)
        self.recorder.record("sms_code", began, loop.time())
        return challenge.challenge_id, code

    async def _stages(self, kind: JourneyKind, user: User, stage: list[str]) -> None:
        loop = asyncio.get_running_loop()
        client = self.target.client()
        clock = loop.time
        token = user.session_token
        if kind.runs("register"):
            challenge_id, code = await self._code(client, "REGISTER", user, None, stage)
            stage[0], began = "register", clock()
            session = await client.register(
                name=user.name, id_number=user.id_number, phone=user.phone, challenge_id=challenge_id,
                sms_code=code, card_number=user.card_number, payment_password=user.payment_password,
                region=user.region,
            )
            self.recorder.record("register", began, clock())
            token = session.session_token
        elif kind.runs("sign_in"):
            challenge_id, code = await self._code(client, "SIGN_IN", user, None, stage)
            stage[0], began = "sign_in", clock()
            session = await client.sign_in(phone=user.phone, challenge_id=challenge_id, sms_code=code)
            self.recorder.record("sign_in", began, clock())
            token = session.session_token
        if not kind.runs("query"):
            return
        challenge_id, code = await self._code(client, "QUERY_AUTH", user, token, stage)
        stage[0], began = "submit", clock()
        query = await client.submit_query(
            agreement_version=self.agreement_version, challenge_id=challenge_id, sms_code=code,
            face_token=FACE_TOKEN, session_token=token,
        )
        accepted = clock()
        self.recorder.record("submit", began, accepted)
        if not kind.runs("watch"):
            return
        stage[0] = "ready"
        status, ready_at = query.status, clock()
        if status == common_pb2.QUERY_STATUS_PENDING:
            # Read to its end, which follows the event out of PENDING: a cancelled stream costs
            # the gateway and report_service more than its end does.
            async with contextlib.aclosing(client.watch_query(query.query_id, session_token=token)) as events:
                async for event in events:
                    if status == common_pb2.QUERY_STATUS_PENDING:
                        status, ready_at = event.query.status, clock()
        if status != common_pb2.QUERY_STATUS_READY:
            raise QueryNotReady(status)
        self.recorder.record("ready", accepted, ready_at)
        if not kind.runs("report"):
            return
        stage[0], began = "report", clock()
        await client.get_report(query.query_id, user.payment_password, session_token=token)
        self.recorder.record("report", began, clock())
