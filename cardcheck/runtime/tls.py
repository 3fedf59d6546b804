"""TLS material read from files, and the grpc credentials made of it.

Servers take `grpc.dynamic_ssl_server_credentials`: before each new handshake grpc asks
`ServerTlsFiles.fetch` for the certificate configuration, which reads the files again when one
of them changed (a stat a handshake), so a certificate cert-manager or a service mesh renews is
presented from the next connection on, without a restart. A file caught half-written (a key
that does not match its certificate yet) keeps the previous configuration until the next
handshake.

Channels read their CA, certificate and key when opened. A service's certificate is both its
server and its client certificate; the client side of a rotation is picked up by channels
opened after it (`cardcheck.runtime.channels.open_channel` reopens its channel when the files
change, see `RenewingChannel`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

Built = TypeVar("Built")


@dataclass(frozen=True)
class TlsFiles:
    """Where one identity's material is: the CA its peers are checked against, its certificate
    chain and its private key (PEM)."""

    ca: Path
    certificate: Path
    key: Path

    def paths(self) -> tuple[Path, Path, Path]:
        return self.ca, self.certificate, self.key

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when one of the files does (mtime, size, inode): cheap enough for every
        handshake. A Kubernetes Secret volume swaps a symlink, which changes the inode."""
        stamps = []
        for path in self.paths():
            found = os.stat(path)
            stamps.append((found.st_mtime_ns, found.st_size, found.st_ino))
        return tuple(stamps)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, certificate, key) as bytes, checked: each parses and the key is the certificate's.
        ValueError says which file is wrong."""
        ca, certificate, key = (path.read_bytes() for path in self.paths())
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise ValueError(f"{self.ca} holds no PEM certificate") from None
        try:
            leaf = x509.load_pem_x509_certificates(certificate)[0]
        except ValueError:
            raise ValueError(f"{self.certificate} holds no PEM certificate") from None
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{self.key} holds no unencrypted PEM private key") from None
        if private.public_key() != leaf.public_key():
            raise ValueError(f"{self.key} is not the key of {self.certificate}")
        return ca, certificate, key


class ChangedFiles(Generic[Built]):
    """What is built from TLS files, built again when they change on disk. Files that cannot be
    used (yet: a rotation half-written) leave the last good one in place, with a warning."""

    def __init__(self, files: TlsFiles, build: Callable[[TlsFiles], Built]) -> None:
        """Builds at once: ValueError or OSError says what is wrong with the files at start."""
        self.files = files
        self._build = build
        try:
            self._stamp = files.stamp()  # before the build: a change during it is seen next time
        except OSError:
            build(files)  # its error names what is wrong with the files
            raise
        self.current = build(files)
        self.changes = 0

    def rebuilt(self) -> Built | None:
        """The new build when the files changed since the last one, else None."""
        try:
            stamp = self.files.stamp()
            if stamp == self._stamp:
                return None
            built = self._build(self.files)
        except (OSError, ValueError) as error:
            log.warning("TLS files changed but cannot be used yet, keeping the previous ones: %s", error)
            return None
        self._stamp, self.current = stamp, built
        self.changes += 1
        log.info("TLS certificate %s changed: now in use", self.files.certificate)
        return built


@dataclass
class ServerTlsFiles:
    """A server's TLS from files, reloaded when they change (module docstring)."""

    files: TlsFiles
    require_client_auth: bool
    _watched: ChangedFiles[grpc.ServerCertificateConfiguration] | None = field(default=None, init=False)

    @property
    def reloads(self) -> int:
        return self._watched.changes if self._watched is not None else 0

    def _configuration(self, files: TlsFiles) -> grpc.ServerCertificateConfiguration:
        ca, certificate, key = files.read()
        return grpc.ssl_server_certificate_configuration(
            [(key, certificate)], root_certificates=ca if self.require_client_auth else None
        )

    def credentials(self) -> grpc.ServerCredentials:
        """ValueError or OSError when the files are missing or wrong at start."""
        self._watched = ChangedFiles(self.files, self._configuration)
        return grpc.dynamic_ssl_server_credentials(
            # grpc keeps the current configuration when the fetcher answers None (its stubs say otherwise)
            self._watched.current, self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.require_client_auth,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate_configuration_fetcher: a new configuration when the files changed,
        else None (keep the current one). Never raises: grpc would fail the handshake."""
        return self._watched.rebuilt() if self._watched is not None else None


def channel_credentials(files: TlsFiles, *, present_certificate: bool = True) -> grpc.ChannelCredentials:
    """Checks the server against `files.ca` and, with `present_certificate`, presents the
    certificate and key (mutual TLS)."""
    ca, certificate, key = files.read()
    if not present_certificate:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=certificate)
