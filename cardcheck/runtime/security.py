"""What TLS a service's server and channels use, from Settings (docs/security.md).

With CARDCHECK_TLS off (the embedded default) everything is plaintext, as before. On:
- an internal server requires a client certificate from the mesh's CA and authorizes each call
  by the identity in it (cardcheck/runtime/access.py);
- the gateway's public port serves TLS with server authentication only;
- every channel to another service checks the server against the mesh's CA and presents the
  calling service's certificate, opened again when those files change (renewing.py);
- every server also serves grpc.health.v1 alone, in plaintext, on its health address (its gRPC
  port + 2000): the kubelet's gRPC probe speaks no TLS, and grpc Python's servers can only
  require a client certificate or not ask for one, so the probes cannot share the mTLS port."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from cardcheck.runtime.access import OPERATOR, Access, AccessInterceptor
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.tls import ServerTlsFiles, TlsFiles, channel_credentials


@dataclass
class ServerSecurity:
    """A server's TLS, the access check of its calls (None: no check, the public port), and
    where it serves plaintext health."""

    tls: ServerTlsFiles
    access: Access | None
    health_address: str

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AccessInterceptor(self.access)] if self.access is not None else []


def server_security(settings: Settings, service: str) -> ServerSecurity | None:
    """None with TLS off."""
    if not settings.tls:
        return None
    if service == "gateway":
        tls = ServerTlsFiles(settings.gateway_public_files(), require_client_auth=False)
        return ServerSecurity(tls, None, settings.health_address(service))
    tls = ServerTlsFiles(settings.tls_files(service), require_client_auth=True)
    return ServerSecurity(tls, Access(settings.sandbox), settings.health_address(service))


def credentials_of(files: TlsFiles) -> grpc.ChannelCredentials:
    """SettingsError, in one line, when the files are missing or wrong."""
    try:
        return channel_credentials(files)
    except OSError as error:
        raise SettingsError(f"TLS file {error.filename} unreadable: {error.strerror or error}") from None
    except ValueError as error:
        raise SettingsError(f"TLS: {error}") from None


def mesh_tls(settings: Settings, service: str) -> TlsFiles | None:
    """What `service`'s channels to the others present and check: None with TLS off."""
    return settings.tls_files(service) if settings.tls else None


def bank_files(settings: Settings, bank_code: str) -> TlsFiles | None:
    """What bank_connector's channel to one bank uses: a bank at its own address
    (CARDCHECK_BANK_ADDR_<CODE>) gets that bank's CA and client certificate; one reached at
    bank_sim's mesh address is a mesh service. None with TLS off."""
    if not settings.tls:
        return None
    if bank_code in settings.bank_addresses:
        return settings.bank_tls_files(bank_code)
    return settings.tls_files("bank_connector")


def operator_channel(settings: Settings, service: str) -> grpc.aio.Channel:
    """A channel to `service` as a person at a terminal: the operator's certificate with TLS on,
    only the CA for the gateway's public port."""
    address = settings.addresses[service]
    if not settings.tls:
        return grpc.aio.insecure_channel(address)
    files = settings.tls_files(OPERATOR)
    if service == "gateway":
        return grpc.aio.secure_channel(address, channel_credentials(files, present_certificate=False))
    return grpc.aio.secure_channel(address, channel_credentials(files))
