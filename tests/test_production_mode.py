"""Production mode (CARDCHECK_SANDBOX=false) through real processes: each service names every
piece it lacks, a line each, and exits 2; given TLS material and a real provider it serves, on
TLS only."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_sim.process import free_port
from cardcheck.runtime.certs import write_development_set
from cardcheck.v1 import gateway_pb2, gateway_pb2_grpc
from tests.harness.processes import ServiceProcess
from tests.harness.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
TLS_OFF = "CARDCHECK_TLS is off: the mesh runs in plaintext"
# What each service lacks beyond TLS on an environment that names nothing.
OWN = {
    "gateway": ["CARDCHECK_SANDBOX is off: set CARDCHECK_FACE_PROVIDER=tencent"],
    "notifier": ["CARDCHECK_SMS_PROVIDER is unset: set it to tencent (or webhook)"],
    "report_service": [],
    "bank_connector": [],
    "bank_sim": [],
}
FACE = {
    "CARDCHECK_FACE_PROVIDER": "tencent",
    "CARDCHECK_TENCENT_SECRET_ID": "AKIDproduction0123456789",
    "CARDCHECK_TENCENT_SECRET_KEY": "production-secret-key-0123",
    "CARDCHECK_TENCENT_FACEID_RULE_ID": "1",
}


def _environment(data_dir: Path, service: str, **more: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CARDCHECK_", "OTEL_"))},
        "CARDCHECK_DATA_DIR": str(data_dir),
        f"CARDCHECK_{service.upper()}_ADDR": "127.0.0.1:0",
        "CARDCHECK_SANDBOX": "false",
        **more,
    }


def test_each_service_names_all_it_lacks_a_line_each_and_exits_2(tmp_path):
    started = {
        service: subprocess.Popen(
            [sys.executable, "-m", service], env=_environment(tmp_path / service, service), cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for service in OWN
    }
    for service, process in started.items():
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, (service, stderr)
        lines = stderr.strip().splitlines()
        assert lines[0] == f"{service}: {TLS_OFF}", (service, stderr)
        assert len(lines) == 1 + len(OWN[service]), (service, stderr)
        for line, complaint in zip(lines[1:], OWN[service], strict=True):
            assert line.startswith(f"{service}: {complaint}"), (service, stderr)


def test_with_tls_but_no_face_provider_the_gateway_names_only_that(tmp_path):
    write_development_set(tmp_path / "tls", datetime.now(UTC))
    env = _environment(tmp_path, "gateway", CARDCHECK_TLS="on", CARDCHECK_TLS_DIR=str(tmp_path / "tls"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"gateway: {OWN['gateway'][0]} (and its CARDCHECK_TENCENT_* settings)"]


async def test_given_everything_the_gateway_serves_on_tls_only(tmp_path):
    tls = tmp_path / "tls"
    write_development_set(tls, datetime.now(UTC))
    health_address = f"127.0.0.1:{free_port()}"
    gateway = ServiceProcess(
        "gateway", tmp_path, CARDCHECK_SANDBOX="false", CARDCHECK_TLS="on", CARDCHECK_TLS_DIR=str(tls),
        CARDCHECK_GATEWAY_HEALTH_ADDR=health_address, CARDCHECK_METRICS="off", **FACE,
    )
    await gateway.start(wait=False)
    try:
        async with grpc.aio.insecure_channel(health_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                assert gateway.process.returncode is None, gateway.output()
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving, within=60, every=0.1, what="the gateway serving")
        credentials = grpc.ssl_channel_credentials((tls / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(gateway.address, credentials) as channel:
            banks = await gateway_pb2_grpc.CardCheckStub(channel).ListBanks(gateway_pb2.ListBanksRequest(), timeout=10)
        assert len(banks.banks) == 24
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway_pb2_grpc.CardCheckStub(channel).ListBanks(gateway_pb2.ListBanksRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext on the public port
        assert await gateway.terminate() == 0
    finally:
        await gateway.stop()
    assert "AKIDproduction" not in gateway.output() and "production-secret-key" not in gateway.output()

