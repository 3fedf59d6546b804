"""Face verification with Tencent Cloud FaceID: the gateway on port 0 with the vendor's SDK talking
real HTTP to a fake of the vendor (tests/harness/tencent_faceid.py). StartFaceCheck binds a check
to the user's name and ID number; SubmitQuery takes its token once, when the check passed, was of
this person and is fresh; the vendor slow or failing is UNAVAILABLE, never INTERNAL."""

from __future__ import annotations

import logging
from datetime import timedelta

import grpc
import pytest

from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.v1 import gateway_pb2
from gateway.config import GatewayConfig
from gateway.face import face_setup_problems, face_verifier_for
from tests.harness.gateway import ALICE, BOB, Stack, bearer, refused
from tests.harness.tencent_faceid import RULE_ID, SECRET_ID, SECRET_KEY, FakeFaceId

TIMEOUT_S = 0.5


def _config(fake: FakeFaceId, **overrides) -> GatewayConfig:
    values = dict(
        face_provider="tencent",
        tencent_secret_id=SECRET_ID,
        tencent_secret_key=SECRET_KEY,
        tencent_faceid_rule_id=RULE_ID,
        tencent_faceid_endpoint=fake.endpoint,
        tencent_faceid_timeout_s=TIMEOUT_S,
        # Every attempt below costs a QUERY_AUTH code and a face check.
        sms_user_burst=50.0,
        submit_user_burst=50.0,
    )
    values.update(overrides)
    return GatewayConfig(**values)


@pytest.fixture
def vendor():
    with FakeFaceId() as fake:
        yield fake


async def _start(stack: Stack, token: str) -> gateway_pb2.StartFaceCheckResponse:
    return await stack.gateway.StartFaceCheck(gateway_pb2.StartFaceCheckRequest(), metadata=bearer(token))


async def _submit(stack: Stack, token: str, face_token: str):
    stack.clock.advance(timedelta(seconds=61))  # past the QUERY_AUTH code's resend interval
    return await stack.submit(ALICE, token, face_token=face_token)


async def test_a_passed_check_of_the_user_is_accepted_once_over_every_replica(
    start_stack, vendor: FakeFaceId, caplog
):
    caplog.set_level(logging.DEBUG)
    stack = await start_stack(config=_config(vendor))
    session = await stack.register(ALICE)
    check = await _start(stack, session.session_token)
    assert check.biz_token in vendor.checks and check.url.endswith(check.biz_token)
    assert check.expires_at.ToDatetime().timestamp() > stack.clock.now().timestamp()
    bound = vendor.checks[check.biz_token]
    assert (bound.name, bound.id_card) == (ALICE.name, ALICE.id_number)
    assert all(call.signed for call in vendor.calls)

    vendor.complete(check.biz_token, stack.clock.now() + timedelta(seconds=61))
    query = await _submit(stack, session.session_token, check.biz_token)
    assert len(stack.reports.created) == 1 and query.query_id in stack.reports.queries

    # Another replica on the same database: the token is spent there too, without a vendor call.
    replica = await start_stack(config=_config(vendor))
    replica.clock.set(stack.clock.now())
    asked = vendor.actions().count("GetDetectInfoEnhanced")
    refusal = await refused(
        _submit(replica, session.session_token, check.biz_token),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )
    assert refusal.metadata == {"factor": "face", "cause": "spent"}
    assert vendor.actions().count("GetDetectInfoEnhanced") == asked
    assert len(stack.reports.created) == 1

    # Neither the person, the token nor the key shows in any log line (the SDK's DEBUG included).
    for secret in (ALICE.id_number, ALICE.name, check.biz_token, SECRET_KEY):
        assert secret not in caplog.text


async def test_a_check_that_did_not_pass_was_of_someone_else_or_is_stale_is_refused(
    start_stack, vendor: FakeFaceId
):
    stack = await start_stack(config=_config(vendor))
    session = await stack.register(ALICE)
    token = session.session_token
    outcomes = {
        "not_passed": dict(err_code=1234),
        "other_person": dict(name=BOB.name),
        "stale": dict(),
    }
    for cause, outcome in outcomes.items():
        check = await _start(stack, token)
        at = stack.clock.now() + timedelta(seconds=61)  # when _submit's clock will be
        if cause == "stale":
            at -= timedelta(minutes=10, seconds=1)
        vendor.complete(check.biz_token, at, **outcome)
        refusal = await refused(
            _submit(stack, token, check.biz_token), grpc.StatusCode.PERMISSION_DENIED, "VERIFICATION_FAILED"
        )
        assert refusal.metadata == {"factor": "face", "cause": cause}

    check = await _start(stack, token)
    vendor.complete(check.biz_token, stack.clock.now() + timedelta(seconds=61), id_card=BOB.id_number)
    unfinished = await _start(stack, token)
    for face_token, cause in (
        (check.biz_token, "other_person"),
        (unfinished.biz_token, "not_passed"),
        ("00000000-0000-0000-0000-000000000000", "unknown_token"),
        ("sandbox:pass", "unknown_token"),  # the sandbox's token means nothing to a real provider
    ):
        refusal = await refused(
            _submit(stack, token, face_token), grpc.StatusCode.PERMISSION_DENIED, "VERIFICATION_FAILED"
        )
        assert refusal.metadata == {"factor": "face", "cause": cause}, face_token
    assert stack.reports.created == []


async def test_a_vendor_that_fails_or_is_slow_is_unavailable_and_spends_nothing(
    start_stack, vendor: FakeFaceId
):
    stack = await start_stack(config=_config(vendor))
    session = await stack.register(ALICE)
    token = session.session_token

    vendor.fail_next("InternalError", "busy")
    refusal = await refused(_start(stack, token), grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert refusal.metadata == {"factor": "face"} and refusal.retry_after is not None
    # Credentials the vendor refuses: waiting does not help, so no RetryInfo.
    vendor.fail_next("AuthFailure.SecretIdNotFound")
    refusal = await refused(_start(stack, token), grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert refusal.retry_after is None

    check = await _start(stack, token)
    vendor.complete(check.biz_token, stack.clock.now() + timedelta(seconds=122))
    vendor.fail_next("RequestLimitExceeded")
    refusal = await refused(
        _submit(stack, token, check.biz_token), grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE"
    )
    assert refusal.retry_after is not None
    vendor.delay_s = TIMEOUT_S * 3
    refusal = await refused(_start(stack, token), grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert refusal.retry_after is not None and refusal.metadata == {"factor": "face"}
    vendor.delay_s = 0

    # None of that spent the token: the vendor back, it passes.
    query = await _submit(stack, token, check.biz_token)
    assert len(stack.reports.created) == 1 and query.query_id in stack.reports.queries


async def test_the_sandbox_answers_its_own_token_so_clients_follow_one_flow(stack: Stack):
    session = await stack.register(ALICE)
    check = await stack.client.start_face_check(session_token=session.session_token)
    assert (check.biz_token, check.url) == ("sandbox:pass", "")
    assert check.expires_at.ToDatetime().timestamp() > stack.clock.now().timestamp()
    await stack.submit(ALICE, session.session_token, face_token=check.biz_token)
    assert len(stack.reports.created) == 1


def test_the_settings_say_what_a_provider_lacks_in_one_line_each():
    production = Settings(sandbox=False)
    with pytest.raises(SettingsError) as caught:
        face_verifier_for(production, GatewayConfig())
    assert "\n" not in str(caught.value) and "CARDCHECK_FACE_PROVIDER" in str(caught.value)
    assert face_setup_problems(production, GatewayConfig(face_provider="sandbox")) == [
        "CARDCHECK_FACE_PROVIDER=sandbox needs CARDCHECK_SANDBOX on"
    ]
    assert face_setup_problems(production, GatewayConfig(face_provider="tencent", tencent_secret_id="AKID")) == [
        "CARDCHECK_FACE_PROVIDER=tencent needs CARDCHECK_TENCENT_SECRET_KEY",
        "CARDCHECK_FACE_PROVIDER=tencent needs CARDCHECK_TENCENT_FACEID_RULE_ID",
    ]
    with pytest.raises(SettingsError) as caught:
        GatewayConfig.from_env({"CARDCHECK_TENCENT_FACEID_ENDPOINT": "http://faceid.example.com"})
    assert "CARDCHECK_TENCENT_FACEID_ENDPOINT" in str(caught.value)
    config = GatewayConfig.from_env({
        "CARDCHECK_FACE_PROVIDER": "tencent", "CARDCHECK_TENCENT_SECRET_ID": SECRET_ID,
        "CARDCHECK_TENCENT_SECRET_KEY": SECRET_KEY, "CARDCHECK_TENCENT_FACEID_RULE_ID": RULE_ID,
    })
    assert face_setup_problems(production, config) == []
    assert SECRET_KEY not in repr(config) and SECRET_ID not in repr(config)
