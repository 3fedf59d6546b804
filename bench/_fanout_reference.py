"""The bare reference for bench/fanout.py: a minimal grpc.aio BankConnector.FanOut that gathers
the same bank calls against the same bank_sim over one channel, streaming each outcome as it
arrives, with no retries, no breaker, no bulkhead, no admission and no tracing, on the event
loop the services run on (uvloop). Run as its own process: `python -m bench._fanout_reference --port P --bank-sim HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cardcheck.v1 import bank_connector_pb2, bank_connector_pb2_grpc, bank_pb2, bank_pb2_grpc, common_pb2

CARD_TYPES = {common_pb2.CARD_TYPE_DEBIT, common_pb2.CARD_TYPE_CREDIT}


class BareFanOut(bank_connector_pb2_grpc.BankConnectorServicer):
    def __init__(self, stub: bank_pb2_grpc.IssuingBankStub) -> None:
        self._stub = stub

    async def _ask(self, code: str, request, timeout_s: float) -> bank_connector_pb2.FanOutResponse:
        try:
            answer = await self._stub.LookupCards(
                bank_pb2.LookupCardsRequest(bank_code=code, id_number=request.id_number, name=request.name),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            kind = (common_pb2.BANK_OUTCOME_KIND_TIMED_OUT if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    else common_pb2.BANK_OUTCOME_KIND_ERROR)
            return bank_connector_pb2.FanOutResponse(bank_code=code, kind=kind, detail=error.code().name, attempts=1)
        cards = [
            common_pb2.MaskedCard(bank_code=code, card_type=card.card_type, first4=card.pan[:4], last4=card.pan[-4:])
            for card in answer.cards if card.card_type in CARD_TYPES
        ]
        return bank_connector_pb2.FanOutResponse(bank_code=code, kind=common_pb2.BANK_OUTCOME_KIND_ANSWERED, cards=cards, attempts=1)

    async def FanOut(self, request, context):
        timeout = request.per_bank_timeout_ms / 1000 if request.per_bank_timeout_ms else 5.0
        tasks = [asyncio.create_task(self._ask(code, request, timeout)) for code in request.bank_codes]
        try:
            for next_outcome in asyncio.as_completed(tasks):
                yield await next_outcome
        finally:
            for task in tasks:
                task.cancel()


async def serve(port: int, bank_sim: str) -> None:
    channel = grpc.aio.insecure_channel(bank_sim)
    server = grpc.aio.server()
    bank_connector_pb2_grpc.add_BankConnectorServicer_to_server(BareFanOut(bank_pb2_grpc.IssuingBankStub(channel)), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._fanout_reference")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bank-sim", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.bank_sim))


if __name__ == "__main__":
    main()
