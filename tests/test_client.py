"""cardcheck.client against a small fake CardCheck server: refusals come back as CardCheckError
with their details, the session token goes out as bearer metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from cardcheck.client import (
    ERRORS,
    CardCheckClient,
    InvalidArgument,
    PaymentPasswordLocked,
    RateLimited,
    ServiceBusy,
    StreamExpired,
)
from cardcheck.runtime.errors import REASONS, CardCheckError, FieldViolation, abort, invalid_argument
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class FakeCardCheck(gateway_pb2_grpc.CardCheckServicer):
    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        self.purposes: list[int] = []
        self.resets: list[gateway_pb2.ResetPaymentPasswordRequest] = []
        self.watches = 0

    def _seen(self, context) -> None:
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization"))

    async def ListBanks(self, request, context):
        # A plain status without our ErrorInfo, as from a proxy.
        await context.abort(grpc.StatusCode.UNAVAILABLE, "upstream connect error")

    async def RequestSmsCode(self, request, context):
        self._seen(context)
        self.purposes.append(request.purpose)
        if request.purpose == common_pb2.SMS_PURPOSE_REGISTER:
            await abort(
                context,
                CardCheckError(
                    "RATE_LIMITED",
                    "too soon",
                    metadata={"retry_after_seconds": "40"},
                    retry_after=timedelta(seconds=40),
                ),
            )
        return gateway_pb2.SmsChallenge(
            challenge_id="c" * 32, expires_in_seconds=300, resend_after_seconds=60
        )

    async def Register(self, request, context):
        await abort(
            context,
            invalid_argument(
                [FieldViolation("name", "required"), FieldViolation("id_number", "bad check digit")]
            ),
        )

    async def SignIn(self, request, context):
        return gateway_pb2.Session(user_id="u1", session_token="token-1")

    async def ListQueries(self, request, context):
        self._seen(context)
        return gateway_pb2.ListQueriesResponse(
            queries=[common_pb2.Query(query_id="q2"), common_pb2.Query(query_id="q1")]
        )

    async def WatchQuery(self, request, context):
        self._seen(context)
        self.watches += 1
        yield gateway_pb2.QueryEvent(query=common_pb2.Query(query_id=request.query_id))
        if request.query_id == "expiring" and self.watches == 1:
            await abort(context, CardCheckError("STREAM_EXPIRED", retry_after=timedelta(0)))
        elif request.query_id == "expiring":
            yield gateway_pb2.QueryEvent(
                query=common_pb2.Query(query_id=request.query_id, status=common_pb2.QUERY_STATUS_READY)
            )
            return
        await abort(context, CardCheckError("NOT_FOUND", "gone"))

    async def GetReport(self, request, context):
        await abort(context, CardCheckError("PAYMENT_PASSWORD_LOCKED", retry_after=timedelta(minutes=30)))

    async def SubmitQuery(self, request, context):
        await abort(context, CardCheckError("SERVICE_BUSY", retry_after=timedelta(seconds=2)))

    async def ResetPaymentPassword(self, request, context):
        self._seen(context)
        if request.face_token != "sandbox:pass":
            await abort(context, CardCheckError("VERIFICATION_FAILED", metadata={"factor": "face"}))
        self.resets.append(request)
        return gateway_pb2.ResetPaymentPasswordResponse()

    async def SignOut(self, request, context):
        self._seen(context)
        return gateway_pb2.SignOutResponse(sessions_ended=3 if request.everywhere else 1)


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeCardCheck, str]]:
    fake = FakeCardCheck()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_CardCheckServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_refusals_become_card_check_errors(served):
    fake, address = served
    async with CardCheckClient(address) as client:
        with pytest.raises(CardCheckError) as caught:
            await client.register(
                name="",
                id_number="1",
                phone="13800000000",
                challenge_id="c",
                sms_code="1",
                card_number="1",
                payment_password="1",
                region="CN-JL",
            )
        error = caught.value
        assert isinstance(error, InvalidArgument)
        assert error.reason == "INVALID_ARGUMENT" and error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in error.violations] == [
            ("name", "required"),
            ("id_number", "bad check digit"),
        ]
        assert isinstance(error.__cause__, grpc.aio.AioRpcError)

        with pytest.raises(CardCheckError) as caught:
            await client.request_sms_code("REGISTER", "13800000000")
        assert caught.value.reason == "RATE_LIMITED" and isinstance(caught.value, RateLimited)
        assert caught.value.retry_after == timedelta(seconds=40)
        assert caught.value.metadata == {"retry_after_seconds": "40"}

        with pytest.raises(PaymentPasswordLocked) as caught:
            await client.get_report("q1", "123456")
        assert caught.value.reason == "PAYMENT_PASSWORD_LOCKED" and caught.value.retry_after == timedelta(
            minutes=30
        )


async def test_each_reason_has_its_own_exception_class(served):
    _, address = served
    async with CardCheckClient(address, session_token="t") as client:
        with pytest.raises(ServiceBusy) as caught:
            await client.submit_query(agreement_version="v", challenge_id="c", sms_code="1", face_token="f")
        assert caught.value.retry_after == timedelta(seconds=2) and caught.value.message_zh.startswith(
            "申请人数过多"
        )
    assert set(ERRORS) == set(REASONS)
    assert len(set(ERRORS.values())) == len(REASONS)
    assert all(issubclass(cls, CardCheckError) for cls in ERRORS.values())
    assert ERRORS["RATE_LIMITED"] is RateLimited and RateLimited.__name__ == "RateLimited"


async def test_sign_out_forgets_the_token(served):
    fake, address = served
    async with CardCheckClient(address, session_token="mine") as client:
        assert await client.sign_out(session_token="another") == 1
        assert client.session_token == "mine"  # another session was signed out, not this one
        assert await client.sign_out(everywhere=True) == 3
        assert client.session_token is None
    assert fake.authorizations == ["Bearer another", "Bearer mine"]


async def test_a_status_without_error_info_is_reraised(served):
    _, address = served
    async with CardCheckClient(address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.list_banks()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_session_token_is_sent_once_signed_in(served):
    fake, address = served
    channel = grpc.aio.insecure_channel(address)
    client = CardCheckClient(channel=channel)
    try:
        assert [q.query_id for q in await client.list_queries()] == ["q2", "q1"]
        session = await client.sign_in(phone="13800000000", challenge_id="c" * 32, sms_code="123456")
        assert session.session_token == "token-1" and client.session_token == "token-1"
        await client.list_queries()
        await client.request_sms_code("QUERY_AUTH")
        await client.list_queries(session_token="other")
        assert fake.authorizations == [None, "Bearer token-1", "Bearer token-1", "Bearer other"]
        assert fake.purposes == [common_pb2.SMS_PURPOSE_QUERY_AUTH]

        events = []
        with pytest.raises(CardCheckError) as caught:
            async for event in client.watch_query("q1", deadline_s=30):
                events.append(event)
        assert [e.query.query_id for e in events] == ["q1"]
        assert caught.value.reason == "NOT_FOUND"
    finally:
        await client.close()
        assert channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN  # not the client's to close
        await channel.close()


async def test_reset_payment_password_sends_its_fields_with_the_session(served):
    fake, address = served
    async with CardCheckClient(address, session_token="mine") as client:
        fields = dict(challenge_id="c" * 32, sms_code="123456", new_payment_password="246801")
        assert await client.reset_payment_password(face_token="sandbox:pass", **fields) is None
        with pytest.raises(CardCheckError) as caught:
            await client.reset_payment_password(face_token="sandbox:fail", **fields)
        assert caught.value.reason == "VERIFICATION_FAILED" and caught.value.metadata == {"factor": "face"}
    assert fake.authorizations == ["Bearer mine", "Bearer mine"]
    assert [(r.challenge_id, r.sms_code, r.face_token, r.new_payment_password) for r in fake.resets] == [
        ("c" * 32, "123456", "sandbox:pass", "246801")
    ]


async def test_a_watch_that_reaches_its_lifetime_is_opened_again(served):
    fake, address = served
    async with CardCheckClient(address, session_token="token-1") as client:
        events = [event async for event in client.watch_query("expiring", deadline_s=30)]
        # Each opening starts with the state so far; the second one follows the query to READY.
        assert [e.query.status for e in events] == [
            common_pb2.QUERY_STATUS_UNSPECIFIED,
            common_pb2.QUERY_STATUS_UNSPECIFIED,
            common_pb2.QUERY_STATUS_READY,
        ]
        assert fake.watches == 2
        fake.watches = 0
        with pytest.raises(StreamExpired) as caught:
            async for _ in client.watch_query("expiring", reopen=False):
                pass
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.retry_after == timedelta(0)


def test_client_needs_exactly_one_of_address_and_channel():
    with pytest.raises(ValueError):
        CardCheckClient()
