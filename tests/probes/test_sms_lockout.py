"""Probe: someone who knows a person's phone asks for REGISTER and SIGN_IN codes for it until the
gateway refuses, from an address of its own; the person still gets their QUERY_AUTH code and
submits a query, and still signs in from where they signed in before (gateway/challenges.py)."""

from __future__ import annotations

import asyncio

import pytest

from cardcheck.cli.demo import Journey
from cardcheck.runtime.errors import CardCheckError
from cardcheck.v1 import common_pb2, gateway_pb2
from tests.probes.conftest import journey_of, register, registrable_people

ATTACKER = "203.0.113.66"
MESH_ENV = {
    # The attacker's address comes in x-forwarded-for (the owner's calls have none: 127.0.0.1).
    "CARDCHECK_CALLER_HEADER": "x-forwarded-for",
    "CARDCHECK_SMS_CALLER_BURST": "1000",
    # Waits of a fraction of a second, so the attacker reaches the daily cap at once.
    "CARDCHECK_SMS_RESEND_S": "0.3",
    "CARDCHECK_SMS_ESCALATION_S": "0.2,0.4",
}


async def _ask_until_refused(attacker: Journey) -> int:
    """REGISTER and SIGN_IN codes, honouring every wait, until refused for the day: how many
    codes were granted."""
    granted = 0
    for i in range(40):
        purpose = (common_pb2.SMS_PURPOSE_REGISTER, common_pb2.SMS_PURPOSE_SIGN_IN)[i % 2]
        try:
            await attacker.call(
                attacker.gateway.RequestSmsCode,
                gateway_pb2.RequestSmsCodeRequest(phone=attacker.person.phone, purpose=purpose),
            )
        except CardCheckError as error:
            assert error.reason == "RATE_LIMITED", error
            if error.metadata.get("limit") == "phone_daily":
                return granted
            assert error.retry_after is not None and error.retry_after.total_seconds() < 2, error
            await asyncio.sleep(error.retry_after.total_seconds())
            continue
        granted += 1
    pytest.fail(f"{granted} codes and never refused for the day")


async def test_anonymous_codes_do_not_lock_the_owner_out(probe_mesh):
    person = registrable_people()[0]
    async with journey_of(probe_mesh, person) as owner, journey_of(probe_mesh, person) as attacker:
        await register(owner)  # one anonymous code of the day, verified from 127.0.0.1
        attacker.metadata = (("x-forwarded-for", ATTACKER),)
        # A stranger gets the daily cap less the reserve (8 - 3) less the owner's code.
        assert await _ask_until_refused(attacker) == 4

        # The owner's QUERY_AUTH code arrives, and the query is submitted.
        challenge_id, code = await owner.sms_code(common_pb2.SMS_PURPOSE_QUERY_AUTH)
        agreement = await owner.call(owner.gateway.GetAgreement, gateway_pb2.GetAgreementRequest())
        query = await owner.call(
            owner.gateway.SubmitQuery,
            gateway_pb2.SubmitQueryRequest(
                agreement_version=agreement.version, consent_given=True, challenge_id=challenge_id,
                sms_code=code, face_token="sandbox:pass", idempotency_key="sms-lockout-probe",
            ),
        )
        assert query.query_id and query.status == common_pb2.QUERY_STATUS_PENDING

        # And the owner signs in again from the address it verified the phone from.
        owner.metadata = ()
        challenge_id, code = await owner.sms_code(common_pb2.SMS_PURPOSE_SIGN_IN)
        session = await owner.call(
            owner.gateway.SignIn,
            gateway_pb2.SignInRequest(phone=person.phone, challenge_id=challenge_id, sms_code=code),
        )
        assert session.session_token
