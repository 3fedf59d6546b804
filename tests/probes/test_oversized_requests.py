"""A signed-in user sends SubmitQuery with ~1.3 million junk bank codes (3.9 MB, under grpc's
default 4 MiB), three times. Each is refused RESOURCE_EXHAUSTED by grpc before it is parsed,
the gateway's peak memory barely moves (parsed, validated and answered one violation per code,
the three once raised it by ~1.6 GB, past the 768 Mi a staging pod has), and the user's next
SubmitQuery goes through: the refusals never reached the application, so they spent none of
the user's budget."""

from __future__ import annotations

import grpc
import pytest

from bank_sim.process import PeakMemory
from cardcheck.v1 import common_pb2, gateway_pb2
from tests.probes.conftest import journey_of, register, registrable_people

JUNK_CODES = 1_300_000  # "!" each, not a bank code: 3 bytes on the wire, 3.9 MB in all
MAX_GROWTH_KB = 50 * 1024


async def test_three_oversized_submissions_are_refused_without_growing_the_gateway(probe_mesh) -> None:
    person = registrable_people()[40]
    junk = gateway_pb2.SubmitQueryRequest(bank_codes=["!"] * JUNK_CODES).SerializeToString()
    assert 3_800_000 < len(junk) < 4 * 1024 * 1024
    peak = PeakMemory(probe_mesh.children()["gateway"])
    async with journey_of(probe_mesh, person) as journey:
        await register(journey)
        submit = journey.gateway_channel.unary_unary("/cardcheck.v1.CardCheck/SubmitQuery")
        peak.reset()
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(junk, metadata=journey.metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
            assert "larger than max" in caught.value.details()
        growth = peak.growth_kb()
        assert growth < MAX_GROWTH_KB, f"the gateway's peak RSS grew by {growth} kB"

        challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_QUERY_AUTH)
        agreement = await journey.call(journey.gateway.GetAgreement, gateway_pb2.GetAgreementRequest())
        query = await journey.call(
            journey.gateway.SubmitQuery,
            gateway_pb2.SubmitQueryRequest(
                bank_codes=["ICBC"], agreement_version=agreement.version, consent_given=True,
                challenge_id=challenge_id, sms_code=code, face_token="sandbox:pass",
            ),
        )
        assert query.status == common_pb2.QUERY_STATUS_PENDING and list(query.bank_codes) == ["ICBC"]
