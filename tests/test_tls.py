"""TLS and access in-process, on real TLS channels to servers on port 0: the development
certificates, who may call what (every RPC of the internal services, every identity), a server
certificate rotated under a running server, and the allow-list held to the calls the code makes."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cardcheck.cli.main import main as cli
from cardcheck.refusals import from_rpc_error
from cardcheck.runtime.access import ALLOWED, FRAMEWORK_SERVICES, OPERATOR, Access
from cardcheck.runtime.certs import IDENTITIES, TRUST_DOMAIN, issue, spiffe_id, write_identity
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.renewing import RenewingChannel
from cardcheck.runtime.security import ServerSecurity, credentials_of, server_security
from cardcheck.runtime.server import Registration, ServiceHost
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.runtime.tls import ServerTlsFiles, TlsFiles, channel_credentials
from cardcheck.v1 import (
    bank_connector_pb2_grpc,
    bank_pb2_grpc,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2_grpc,
)
from tests.deploy_manifests import SERVICES, code_edges, health_names
from tests.harness.metrics import samples, scrape

INTERNAL = {  # what each internal process serves, as its app.py registers it
    "cardcheck.v1.ReportService": report_service_pb2_grpc.add_ReportServiceServicer_to_server,
    "cardcheck.v1.BankConnector": bank_connector_pb2_grpc.add_BankConnectorServicer_to_server,
    "cardcheck.v1.Notifier": notifier_pb2_grpc.add_NotifierServicer_to_server,
    "cardcheck.v1.IssuingBank": bank_pb2_grpc.add_IssuingBankServicer_to_server,
    "cardcheck.v1.BankSimControl": bank_pb2_grpc.add_BankSimControlServicer_to_server,
}


def _servant(name: str) -> object:
    """A servicer of `name` whose every method answers at once, OK and empty: a call that gets
    past the check ends well."""
    service = descriptor_pool.Default().FindServiceByName(name)
    methods: dict[str, object] = {}
    for method in service.methods:
        answer = message_factory.GetMessageClass(method.output_type)
        if method.server_streaming:
            async def stream(self, request, context, answer=answer):
                yield answer()

            methods[method.name] = stream
        else:
            async def unary(self, request, context, answer=answer):
                return answer()

            methods[method.name] = unary
    return type(f"Answering{service.name}", (), methods)()


STRANGER = "stranger"  # a certificate of the mesh's CA naming an identity the table does not know


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tls-data")
    os.environ.pop("CARDCHECK_TLS_DIR", None)
    with pytest.raises(SystemExit) as done:
        cli(["certs", "--data-dir", str(data_dir)])
    assert done.value.code == 0
    directory = data_dir / "tls"
    from cardcheck.runtime.certs import _authority  # the CA `certs` kept, to issue the stranger

    write_identity(directory, _authority(directory, "unused", datetime.now(UTC)), STRANGER, datetime.now(UTC))
    return directory


def test_certs_writes_a_ca_and_each_identity_private_to_its_user(tls_dir: Path) -> None:
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    assert _mode(tls_dir) == 0o700 and _mode(tls_dir / "banks") == 0o700
    for name in IDENTITIES:
        assert _mode(tls_dir / f"{name}.key") == 0o600 and _mode(tls_dir / f"{name}.pem") == 0o600
        certificate = x509.load_pem_x509_certificate((tls_dir / f"{name}.pem").read_bytes())
        certificate.verify_directly_issued_by(ca)
        uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}/{name}"]
    banks_ca = x509.load_pem_x509_certificate((tls_dir / "banks" / "ca.pem").read_bytes())
    for name in ("bank_sim", "bank_connector"):
        assert _mode(tls_dir / "banks" / f"{name}.key") == 0o600
        x509.load_pem_x509_certificate((tls_dir / "banks" / f"{name}.pem").read_bytes()).verify_directly_issued_by(
            banks_ca
        )


def _settings(tls_dir: Path, **more) -> Settings:
    return Settings(tls=True, tls_dir=tls_dir, data_dir=tls_dir.parent, **more)


def test_tls_missing_names_each_missing_file(tmp_path: Path, tls_dir: Path) -> None:
    assert _settings(tls_dir).tls_missing("notifier") == []
    assert Settings(data_dir=tmp_path).tls_missing("notifier") == ["CARDCHECK_TLS is off: the mesh runs in plaintext"]
    lacking = _settings(tmp_path / "nowhere").tls_missing("bank_connector")
    assert lacking == [f"no readable TLS file {tmp_path / 'nowhere' / f}"
                       for f in ("ca.pem", "bank_connector.pem", "bank_connector.key")]


def _channel(tls_dir: Path, port: int, identity: str) -> grpc.aio.Channel:
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / f"{identity}.pem", tls_dir / f"{identity}.key")
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(files))


async def _host(tls_dir: Path, sandbox: bool, tmp_path: Path, metrics: ServiceMetrics | None = None) -> ServiceHost:
    """Every internal service on one server, with the generated servicers (UNIMPLEMENTED answers
    a call the check let through)."""
    settings = _settings(tls_dir, sandbox=sandbox, health_addresses={"notifier": "127.0.0.1:0"})
    security = server_security(settings, "notifier")
    assert security is not None
    host = ServiceHost(
        "access", [Registration(add, _servant(name), name) for name, add in INTERNAL.items()],
        "127.0.0.1:0", make_tracer_provider("test", tmp_path), metrics=metrics, security=security,
    )
    await host.start()
    return host


def _methods() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every RPC the internal servers serve, and
    health's Check and reflection's one method."""
    pool = descriptor_pool.Default()
    found = []
    for name in [*INTERNAL, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            if method.full_name != "grpc.health.v1.Health.Watch":  # streams for good; Check stands for it
                found.append((f"/{name}/{method.name}", method.client_streaming, method.server_streaming))
    return found


async def _reflect(channel: grpc.aio.Channel, path: str, wait_s: float = 0.05) -> None:
    """One reflection request (list_services), one answer."""
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(timeout=5)
    # A refused call ends before reading: its status has then come in before the write, which
    # would otherwise fail in the client as INTERNAL ("Failed execute_batch"); tried again,
    # waiting longer, if the machine was too slow for that.
    await asyncio.sleep(wait_s)
    if call.done():  # the refusal, as the stream's first read raises it
        async for _ in call:
            pass
    await call.write(b"\x3a\x00")
    await call.done_writing()
    async for _ in call:
        break
    call.cancel()


async def _call(channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool) -> grpc.StatusCode:
    plain = {"request_serializer": None, "response_deserializer": None}
    try:
        if client_streaming:
            try:
                await _reflect(channel, path)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.INTERNAL:
                    raise
                await _reflect(channel, path, wait_s=1.0)
        elif server_streaming:
            async for _ in channel.unary_stream(path, **plain)(b"", timeout=5):
                break
        else:
            await channel.unary_unary(path, **plain)(b"", timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.PERMISSION_DENIED:
            refusal = from_rpc_error(error)
            assert refusal is not None and refusal.reason == "CALLER_NOT_ALLOWED", error
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandbox", "production"])
async def test_each_rpc_admits_exactly_the_callers_the_table_names(tls_dir: Path, tmp_path: Path, sandbox: bool) -> None:
    metrics = ServiceMetrics("access", "127.0.0.1:0")
    host = await _host(tls_dir, sandbox, tmp_path, metrics)
    access = Access(sandbox)
    methods = _methods()
    refused: Counter[str] = Counter()  # of our own methods (health and reflection are not counted)
    try:
        for identity in [*IDENTITIES, STRANGER]:
            async with _channel(tls_dir, host.port, identity) as channel:
                codes = await asyncio.gather(*(_call(channel, *method) for method in methods))
            for (path, _, _), code in zip(methods, codes, strict=True):
                allowed = identity in access.callers(path)
                assert (code != grpc.StatusCode.PERMISSION_DENIED) == allowed, (identity, path, code)
                if not allowed and not path.startswith(FRAMEWORK_SERVICES):
                    refused[path] += 1
        # Each refusal is counted as a call ended PERMISSION_DENIED, with its reason.
        assert metrics.port is not None
        found = samples(await asyncio.to_thread(scrape, metrics.port))
        handled = Counter({f"/{labels['grpc_service']}/{labels['grpc_method']}": count
                           for labels, count in found["grpc_server_handled_total"]
                           if labels["grpc_code"] == "PERMISSION_DENIED"})
        assert handled == refused and refused
        assert sum(count for labels, count in found["cardcheck_refusals_total"]
                   if labels["reason"] == "CALLER_NOT_ALLOWED") == sum(refused.values())
        # Spot checks of the table as the issue words it.
        assert access.callers("/cardcheck.v1.Notifier/ListMessages") >= {"gateway", "report_service"}
        assert (OPERATOR in access.callers("/cardcheck.v1.Notifier/ListMessages")) == sandbox
        assert (OPERATOR in access.callers("/cardcheck.v1.BankSimControl/SetBehaviour")) == sandbox
        assert access.callers("/cardcheck.v1.IssuingBank/LookupCards") == {"bank_connector"}
    finally:
        await host.stop(0)


async def test_a_caller_without_a_certificate_reaches_only_the_plaintext_health_port(tls_dir: Path, tmp_path) -> None:
    host = await _host(tls_dir, True, tmp_path)
    try:
        only_ca = channel_credentials(TlsFiles(tls_dir / "ca.pem", tls_dir / "gateway.pem", tls_dir / "gateway.key"),
                                      present_certificate=False)
        async with grpc.aio.secure_channel(f"127.0.0.1:{host.port}", only_ca) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        assert host.health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="cardcheck.v1.Notifier"), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:  # health alone: nothing else there
                await notifier_pb2_grpc.NotifierStub(channel).ListMessages(b"", timeout=5)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await host.stop(0)


def _presented_serial(port: int, tls_dir: Path) -> int:
    """The serial of the certificate a new TLS handshake with the server gets."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.load_cert_chain(tls_dir / "gateway.pem", tls_dir / "gateway.key")
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(__import__("socket").create_connection(("127.0.0.1", port)),
                             server_hostname="localhost") as connection:
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _own_copy(tls_dir: Path, tmp_path: Path) -> tuple[Path, ServerTlsFiles]:
    """The CA, notifier's and gateway's files copied for one test to rotate, and notifier's
    server files read from there."""
    own = tmp_path / "tls"
    own.mkdir()
    for name in ("ca.pem", "ca.key", "notifier.pem", "notifier.key", "gateway.pem", "gateway.key"):
        (own / name).write_bytes((tls_dir / name).read_bytes())
    return own, ServerTlsFiles(TlsFiles(own / "ca.pem", own / "notifier.pem", own / "notifier.key"), require_client_auth=True)


async def test_a_server_certificate_rotated_under_a_running_server_is_presented_next(tmp_path: Path, tls_dir) -> None:
    own, files = _own_copy(tls_dir, tmp_path)
    host = ServiceHost(
        "rotation", [Registration(INTERNAL["cardcheck.v1.Notifier"], _servant("cardcheck.v1.Notifier"),
                                  "cardcheck.v1.Notifier")],
        "127.0.0.1:0", make_tracer_provider("test", tmp_path), security=ServerSecurity(files, None, "127.0.0.1:0"),
    )
    port = await host.start()
    try:
        before = x509.load_pem_x509_certificate((own / "notifier.pem").read_bytes()).serial_number
        assert await asyncio.to_thread(_presented_serial, port, own) == before
        early = _channel(own, port, "gateway")
        await health_pb2_grpc.HealthStub(early).Check(health_pb2.HealthCheckRequest(), timeout=5)

        from cardcheck.runtime.certs import _authority

        rotated = write_identity(own, _authority(own, "unused", datetime.now(UTC)), "notifier", datetime.now(UTC))
        after = rotated.certificate.serial_number
        assert after != before
        assert await asyncio.to_thread(_presented_serial, port, own) == after
        assert files.reloads == 1
        async with _channel(own, port, "gateway") as late:  # a new connection, on the new certificate
            reply = await health_pb2_grpc.HealthStub(late).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The connection made before the rotation carries on.
        await health_pb2_grpc.HealthStub(early).Check(health_pb2.HealthCheckRequest(), timeout=5)
        await early.close()

        # A half-written rotation (a key that is not the certificate's) keeps the last good one.
        (own / "notifier.key").write_text(issue(_authority(own, "unused", datetime.now(UTC)), "notifier",
                                                datetime.now(UTC)).key_pem())
        assert await asyncio.to_thread(_presented_serial, port, own) == after
    finally:
        await host.stop(0)


class EchoingCaller(notifier_pb2_grpc.NotifierServicer):
    """GetDelivery answers with the serial of the certificate the caller presented."""

    async def GetDelivery(self, request, context):
        pem = context.auth_context()["x509_pem_cert"][0]
        return notifier_pb2.GetDeliveryResponse(message_id=str(x509.load_pem_x509_certificate(pem).serial_number))


async def test_a_client_certificate_rotated_under_a_running_channel_is_presented_next(tmp_path: Path, tls_dir) -> None:
    own, files = _own_copy(tls_dir, tmp_path)
    host = ServiceHost(
        "rotation", [Registration(INTERNAL["cardcheck.v1.Notifier"], EchoingCaller(), "cardcheck.v1.Notifier")],
        "127.0.0.1:0", make_tracer_provider("test", tmp_path), security=ServerSecurity(files, None, "127.0.0.1:0"),
    )
    port = await host.start()
    now = [0.0]
    client_files = TlsFiles(own / "ca.pem", own / "gateway.pem", own / "gateway.key")
    channel = RenewingChannel(client_files, credentials_of,
                              lambda c: grpc.aio.secure_channel(f"127.0.0.1:{port}", c), clock=lambda: now[0])
    stub = notifier_pb2_grpc.NotifierStub(channel)  # made once, as the services make theirs
    try:
        def serial(path: Path) -> str:
            return str(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)

        before = serial(own / "gateway.pem")
        assert (await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(), timeout=5)).message_id == before

        from cardcheck.runtime.certs import _authority

        write_identity(own, _authority(own, "unused", datetime.now(UTC)), "gateway", datetime.now(UTC))
        assert (await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(), timeout=5)).message_id == before
        now[0] += 5  # the files are looked at again
        reply = await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(), timeout=5)
        assert reply.message_id == serial(own / "gateway.pem") != before and channel.renewals == 1
    finally:
        await channel.close()
        await host.stop(0)


def test_the_allow_list_admits_exactly_the_calls_the_code_makes() -> None:
    """As the NetworkPolicy check does (tests/deploy_manifests.py): each service-to-service
    call the code makes is allowed, and the table allows no service another it never calls."""
    served_by = {name: service for service in SERVICES for name in health_names(service)}
    assert set(INTERNAL) <= set(served_by)
    allowed = {
        (caller, served_by[key.partition("/")[0]])
        for key, row in ALLOWED.items()
        if key.partition("/")[0] in served_by
        for caller in row.callers | row.in_sandbox
        if caller != OPERATOR
    }
    assert allowed == code_edges()
    assert all(spiffe_id(caller) for row in ALLOWED.values() for caller in row.callers)


async def test_a_simulated_bank_takes_only_the_client_certificate_of_its_own_ca(tls_dir: Path, tmp_path: Path) -> None:
    """bank_sim's per-bank endpoint presents the banks' certificate and requires bank_connector's
    client certificate of the banks' CA; the mesh's certificates open neither end."""
    from bank_connector.connector import open_bank_channel
    from bank_sim.app import build as build_bank_sim
    from cardcheck import dataset
    from cardcheck.v1 import bank_pb2

    settings = _settings(tls_dir, addresses={"bank_sim": "127.0.0.1:0"},
                         health_addresses={"bank_sim": "127.0.0.1:0"})
    records = dataset.generate(5, 20)
    host = await build_bank_sim(settings, records=records, tracer_provider=make_tracer_provider("test", tmp_path),
                                port_per_bank=0)
    await host.start()
    person = next(r for r in records if r.bank == "ICBC" and r.status != "CLOSED" and r.reserved_phone and r.cnp_enabled)
    request = bank_pb2.LookupCardsRequest(bank_code="ICBC", id_number=person.id_number, name=person.holder_name)
    own = host.bank_addresses()["ICBC"]
    try:
        channel = open_bank_channel(own, settings.bank_tls_files("ICBC"))
        async with channel:
            answer = await bank_pb2_grpc.IssuingBankStub(channel).LookupCards(request, timeout=5)
            assert answer.cards
        for wrong in (settings.tls_files("bank_connector"),  # the mesh's CA: neither end trusts the other
                      TlsFiles(tls_dir / "banks" / "ca.pem", tls_dir / "bank_connector.pem", tls_dir / "bank_connector.key")):
            async with open_bank_channel(own, wrong) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await bank_pb2_grpc.IssuingBankStub(channel).LookupCards(request, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await host.stop(0)


async def test_unusable_tls_files_are_one_line_at_start(tmp_path: Path, tls_dir: Path) -> None:
    from cardcheck.runtime.channels import open_channel
    from cardcheck.runtime.server import StartupError
    from cardcheck.runtime.settings import SettingsError

    with pytest.raises(SettingsError, match=r"TLS file .*/nowhere/ca.pem unreadable"):
        open_channel("127.0.0.1:1", tls=TlsFiles(tmp_path / "nowhere" / "ca.pem", tls_dir / "gateway.pem",
                                                  tls_dir / "gateway.key"))
    with pytest.raises(SettingsError, match="is not the key of"):
        open_channel("127.0.0.1:1", tls=TlsFiles(tls_dir / "ca.pem", tls_dir / "gateway.pem", tls_dir / "notifier.key"))
    settings = _settings(tmp_path / "nowhere", health_addresses={"notifier": "127.0.0.1:0"})
    host = ServiceHost("notifier", [], "127.0.0.1:0", make_tracer_provider("test", tmp_path),
                       security=server_security(settings, "notifier"))
    with pytest.raises(StartupError, match="TLS files unusable"):
        await host.start()
    await host.stop(0)
