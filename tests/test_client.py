"""cardcheck.client against a small fake CardCheck server: refusals come back as CardCheckError
with their details, the session token goes out as bearer metadata."""

from __future__ import annotations

import json
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
    Reason,
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


# --- TLS ---------------------------------------------------------------------------------------


def _certificate(name: str, key, issuer_name: str, issuer_key, *, ca: bool = False) -> bytes:
    import ipaddress
    from datetime import UTC, datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> dict[str, bytes]:
    """A CA, the server's certificate for 127.0.0.1 and a client's, each with its key (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    return {
        "ca": _certificate("test ca", ca_key, "test ca", ca_key, ca=True),
        "server": _certificate("gateway", server_key, "test ca", ca_key),
        "server_key": pem(server_key),
        "client": _certificate("a service", client_key, "test ca", ca_key),
        "client_key": pem(client_key),
    }


@pytest.fixture
async def served_mtls(pki) -> AsyncIterator[tuple[FakeCardCheck, str]]:
    """The fake over TLS, admitting only clients with a certificate of the CA."""
    fake = FakeCardCheck()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_CardCheckServicer_to_server(fake, server)
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"], pki["server"])], root_certificates=pki["ca"], require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_mtls_with_the_pem_parts(served_mtls, pki):
    _, address = served_mtls
    async with CardCheckClient(
        address, root_certificates=pki["ca"], private_key=pki["client_key"], certificate_chain=pki["client"]
    ) as client:
        session = await client.sign_in(phone="13800000000", challenge_id="c", sms_code="1")
        assert session.session_token == "token-1"


async def test_mtls_with_channel_credentials(served_mtls, pki):
    _, address = served_mtls
    credentials = grpc.ssl_channel_credentials(pki["ca"], pki["client_key"], pki["client"])
    async with CardCheckClient(address, credentials=credentials, timeout=5) as client:
        assert [q.query_id for q in await client.list_queries(session_token="t")] == ["q2", "q1"]


async def test_without_a_client_certificate_the_server_admits_no_call(served_mtls, pki):
    _, address = served_mtls
    async with CardCheckClient(address, root_certificates=pki["ca"], timeout=5) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.sign_in(phone="13800000000", challenge_id="c", sms_code="1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_of_another_ca_is_not_trusted(served_mtls, pki):
    from cryptography.hazmat.primitives.asymmetric import ec

    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _certificate("other ca", other_key, "other ca", other_key, ca=True)
    _, address = served_mtls
    async with CardCheckClient(
        address, root_certificates=other_ca, private_key=pki["client_key"], certificate_chain=pki["client"],
        timeout=5,
    ) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.sign_in(phone="13800000000", challenge_id="c", sms_code="1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_does_not_reach_a_tls_server(served_mtls):
    _, address = served_mtls
    async with CardCheckClient(address, timeout=5) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.sign_in(phone="13800000000", challenge_id="c", sms_code="1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_settings_that_contradict_each_other_are_refused(pki):
    credentials = grpc.ssl_channel_credentials(pki["ca"])
    with pytest.raises(ValueError, match="not both"):
        CardCheckClient("127.0.0.1:1", credentials=credentials, root_certificates=pki["ca"])
    with pytest.raises(ValueError, match="private key"):
        CardCheckClient("127.0.0.1:1", certificate_chain=pki["client"])
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    with pytest.raises(ValueError, match="given one"):
        CardCheckClient(channel=channel, tls=True)
    await channel.close()


def test_a_reason_is_a_string_enum_whose_value_is_the_wire_string() -> None:
    assert set(Reason) == set(REASONS)
    assert all(reason.value == reason.name for reason in Reason)
    error = CardCheckError("COOLDOWN_ACTIVE")  # given as its string, kept as the Reason
    assert error.reason is Reason.COOLDOWN_ACTIVE and error.reason == "COOLDOWN_ACTIVE"
    assert json.dumps({"reason": error.reason}) == '{"reason": "COOLDOWN_ACTIVE"}'
    assert str(error) == f"COOLDOWN_ACTIVE: {error.message_zh}"
    with pytest.raises(ValueError, match="unknown reason"):
        CardCheckError("NO_SUCH_REASON")
