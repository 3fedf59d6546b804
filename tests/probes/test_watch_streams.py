"""Probe: one signed-in user opening WatchQuery streams on one query until the gateway refuses,
then signing out while they are open. Against `cardcheck up` with its defaults (4 streams per
user, the session read again every 2 s). Once the user is registered the simulated banks are
made slow (BankSimControl), so that the query stays PENDING and its streams open."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cardcheck.runtime.errors import from_rpc_error
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, common_pb2, gateway_pb2
from tests.probes.conftest import journey_of, register, registrable_people

SLOW_BANKS_MS = 60_000.0  # beyond every timeout: no bank answers while the probe runs
STREAMS_PER_USER = 4  # the gateway's default (CARDCHECK_WATCH_STREAMS_PER_USER)
NOTICE_WITHIN_S = 5.0  # the session is read again every 2 s


async def _end_of(call) -> tuple[grpc.StatusCode, float]:
    """How a stream ended, and when (monotonic); an event meanwhile is only progress."""
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            assert event.query.status == common_pb2.QUERY_STATUS_PENDING, "the query finished first"
    except grpc.aio.AioRpcError as error:
        return error.code(), time.monotonic()
    pytest.fail("the stream ended OK after the sign-out")


async def _bank_latency(probe_mesh, latency_ms: float | None) -> None:
    """Every simulated bank this slow; None: as the simulator started."""
    async with grpc.aio.insecure_channel(probe_mesh.settings.addresses["bank_sim"]) as channel:
        control = bank_pb2_grpc.BankSimControlStub(channel)
        if latency_ms is None:
            request = bank_pb2.SetBehaviourRequest(reset=True)
        else:
            request = bank_pb2.SetBehaviourRequest(behaviour=bank_pb2.BankBehaviour(latency_ms=latency_ms))
        await control.SetBehaviour(request, timeout=10)


async def test_watch_streams_are_capped_and_end_when_the_user_signs_out(probe_mesh):
    async with journey_of(probe_mesh, registrable_people()[0]) as journey:
        await register(journey)  # the real-name check needs the banks to answer
        await _bank_latency(probe_mesh, SLOW_BANKS_MS)
        try:
            await _watch_until_refused_then_sign_out(journey)
        finally:
            await _bank_latency(probe_mesh, None)


async def _watch_until_refused_then_sign_out(journey) -> None:
    agreement = await journey.call(journey.gateway.GetAgreement, gateway_pb2.GetAgreementRequest())
    challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_QUERY_AUTH)
    query = await journey.call(
        journey.gateway.SubmitQuery,
        gateway_pb2.SubmitQueryRequest(
            agreement_version=agreement.version, consent_given=True, challenge_id=challenge_id,
            sms_code=code, face_token="sandbox:pass",
        ),
    )
    watch = gateway_pb2.WatchQueryRequest(query_id=query.query_id)

    streams = []
    for _ in range(STREAMS_PER_USER):
        call = journey.gateway.WatchQuery(watch, metadata=journey.metadata, timeout=60)
        first = await call.read()
        assert first.query.status == common_pb2.QUERY_STATUS_PENDING
        streams.append(call)
    one_more = journey.gateway.WatchQuery(watch, metadata=journey.metadata, timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await one_more.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    refusal = from_rpc_error(caught.value)
    assert refusal is not None and refusal.reason == "RATE_LIMITED"
    assert refusal.metadata["limit"] == "watch_streams" and refusal.retry_after is not None

    await journey.call(journey.gateway.SignOut, gateway_pb2.SignOutRequest())
    signed_out_at = time.monotonic()
    ends = await asyncio.wait_for(asyncio.gather(*(_end_of(call) for call in streams)), 30)
    assert [code for code, _ in ends] == [grpc.StatusCode.UNAUTHENTICATED] * STREAMS_PER_USER
    slowest = max(at for _, at in ends) - signed_out_at
    assert slowest < NOTICE_WITHIN_S, slowest
