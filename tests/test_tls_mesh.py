"""The whole mesh on mutual TLS through real processes (`cardcheck up --tls`): the journey, the
README's grpcurl over TLS, `cardcheck load` over TLS, certificates renewed under the running
mesh, a caller without a certificate turned away, and the plaintext health ports the kubelet's
probes use."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cardcheck import dataset
from cardcheck.cli.demo import Journey, walk
from tests.harness.mesh import BIN, start_mesh

pytestmark = pytest.mark.e2e


def presented_serial(port: int, tls: Path) -> int:
    """The serial of the certificate a new handshake with the server at `port` is shown."""
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    context.load_cert_chain(tls / "operator.pem", tls / "operator.key")
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as connection:
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number

PASSWORD = "246810"


async def test_the_journey_over_mutual_tls(tmp_path: Path) -> None:
    records = dataset.generate(77, 30)
    dataset_file = tmp_path / "cards.jsonl"
    dataset.dump(records, dataset_file)
    mesh = start_mesh(tmp_path / "data", "--load-test", "--dataset", str(dataset_file), tls=True)
    try:
        settings = mesh.settings
        tls = mesh.data_dir / "tls"
        assert "TLS: wrote the development CA" in mesh.output()
        person = dataset.pick_demo_person(records)
        journey = Journey(settings, person, PASSWORD)
        try:
            report = await walk(journey)
        finally:
            await journey.close()
        assert len(report.summary) == 24 and not report.unavailable_banks and report.cards

        # The README's grpcurl: the public port with the CA alone, an internal one with a certificate.
        grpcurl = str(BIN / "grpcurl")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([grpcurl, *args], capture_output=True, text=True, timeout=60)

        banks = await asyncio.to_thread(
            run, "-cacert", str(tls / "ca.pem"), "-d", "{}", settings.addresses["gateway"],
            "cardcheck.v1.CardCheck/ListBanks",
        )
        assert banks.returncode == 0, banks.stderr
        assert len(json.loads(banks.stdout)["banks"]) == 24
        health = await asyncio.to_thread(
            run, "-cacert", str(tls / "ca.pem"), "-cert", str(tls / "operator.pem"), "-key",
            str(tls / "operator.key"), settings.addresses["bank_connector"], "grpc.health.v1.Health/Check",
        )
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
        without_certificate = await asyncio.to_thread(
            run, "-cacert", str(tls / "ca.pem"), "-d", "{}", settings.addresses["notifier"],
            "cardcheck.v1.Notifier/ListMessages",
        )
        assert without_certificate.returncode != 0  # no client certificate: no handshake

        # `cardcheck load` over TLS: the gateway verified by the CA, the inbox as the operator.
        rest = [r for r in records if r.id_number.upper() != person.id_number.upper()]
        after_rotation = dataset.pick_demo_person(rest)  # walks once the certificates are renewed
        others = tmp_path / "others.jsonl"
        dataset.dump([r for r in rest if r.id_number.upper() != after_rotation.id_number.upper()], others)
        done = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "cardcheck"), "load", "--rate", "2", "--duration", "2", "--seed", "3", "--dataset", str(others),
             "--ca", str(tls / "ca.pem"), "--cert", str(tls / "operator.pem"), "--key", str(tls / "operator.key"),
             "--report", str(tmp_path / "load"), "--quiet"],
            env=mesh.env, capture_output=True, text=True, timeout=120,
        )
        summary = json.loads((tmp_path / "load" / "summary.json").read_text())
        assert done.returncode == 0 and summary["errors"] == {}, done.stdout + done.stderr
        assert summary["journeys"]["completed"] == summary["journeys"]["started"] > 0

        # Certificates renewed under the running mesh: each server's next handshake presents its
        # new one, and a whole journey (every hop) still goes through.
        renewed = await asyncio.to_thread(
            subprocess.run, [str(BIN / "cardcheck"), "certs", "--renew"], env=mesh.env, capture_output=True, text=True,
            timeout=60,
        )
        assert renewed.returncode == 0, renewed.stderr
        for service in ("gateway", "report_service", "bank_connector", "notifier", "bank_sim"):
            serial = x509.load_pem_x509_certificate((tls / f"{service}.pem").read_bytes()).serial_number
            port = int(settings.addresses[service].rpartition(":")[2])
            assert await asyncio.to_thread(presented_serial, port, tls) == serial, service
        second = Journey(settings, after_rotation, PASSWORD)
        try:
            assert len((await walk(second)).summary) == 24
        finally:
            await second.close()

        # Plaintext: refused on every service port, served on each health port.
        for service in ("gateway", "report_service", "bank_connector", "notifier", "bank_sim"):
            async with grpc.aio.insecure_channel(settings.addresses[service]) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, service
            async with grpc.aio.insecure_channel(settings.health_address(service)) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        code = mesh.stop()
    assert code == 0, mesh.output()
