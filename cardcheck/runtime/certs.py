"""Development certificates: a CA for the mesh, and a certificate and key for each identity
(`cardcheck certs`, `cardcheck up --tls`). Each identity's certificate names it as the URI SAN
`spiffe://cardcheck/<name>` (what the servers authorize by, cardcheck/runtime/access.py) and
serves as both its server and its client certificate; loopback and the Kubernetes Service names
are its DNS and IP SANs, so a channel's usual host name check passes.

The simulated banks get a CA of their own (`banks/`), as real banks each have theirs: bank_sim's
per-bank endpoints present `banks/bank_sim.pem` and accept only a client certificate under
`banks/ca.pem`, which `banks/bank_connector.pem` is.

Nothing here is for production: there cert-manager (or a service mesh) issues the certificates
(deploy/k8s/overlays/production)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cardcheck.runtime.files import private_directory, write_new_private

TRUST_DOMAIN = "cardcheck"
IDENTITIES = ("gateway", "report_service", "bank_connector", "notifier", "bank_sim", "operator")
BANKS_DIR = "banks"
BANK_IDENTITIES = ("bank_sim", "bank_connector")  # the banks' server, and their one client
VALIDITY = timedelta(days=365)


def spiffe_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{name}"


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()


def make_ca(common_name: str, now: datetime) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def _dns_names(name: str) -> list[str]:
    return ["localhost", name.replace("_", "-")]  # the Kubernetes Service: report-service


def issue(ca: Issued, name: str, now: datetime, validity: timedelta = VALIDITY) -> Issued:
    """A certificate for `name`, for both ends of a TLS connection, signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(name)),
        *(x509.DNSName(dns) for dns in _dns_names(name)),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, key)


def _write(path: Path, text: str) -> None:
    """Replaces `path` with a new 0600 file (a rename, so a reader never sees half of it)."""
    fresh = path.with_name(path.name + ".new")
    fresh.unlink(missing_ok=True)
    write_new_private(fresh, text)
    fresh.replace(path)


def write_identity(directory: Path, ca: Issued, name: str, now: datetime) -> Issued:
    issued = issue(ca, name, now)
    _write(directory / f"{name}.key", issued.key_pem())  # the key first: a cert never names a missing key
    _write(directory / f"{name}.pem", issued.certificate_pem())
    return issued


def _authority(directory: Path, common_name: str, now: datetime) -> Issued:
    """The CA kept in `directory` (ca.pem and ca.key), made if missing."""
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return Issued(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
    ca = make_ca(common_name, now)
    _write(key_path, ca.key_pem())
    _write(cert_path, ca.certificate_pem())
    return ca


def missing(tls_dir: Path) -> list[Path]:
    """The files of the development set that are not in `tls_dir`."""
    wanted = [tls_dir / "ca.pem", *(tls_dir / f"{n}{ext}" for n in IDENTITIES for ext in (".pem", ".key"))]
    wanted += [tls_dir / BANKS_DIR / "ca.pem",
               *(tls_dir / BANKS_DIR / f"{n}{ext}" for n in BANK_IDENTITIES for ext in (".pem", ".key"))]
    return [path for path in wanted if not path.is_file()]


def write_development_set(tls_dir: Path, now: datetime, *, renew: bool = False) -> list[Path]:
    """The mesh's CA and each identity's certificate and key in `tls_dir`, and the banks' CA and
    material in `tls_dir/banks`, every file 0600 in 0700 directories. An existing CA is kept (so
    certificates issued again stay trusted); identities are written when missing, or all of them
    with `renew`. Returns the files written."""
    written: list[Path] = []
    for directory, common_name, names in (
        (tls_dir, "cardcheck development CA", IDENTITIES),
        (tls_dir / BANKS_DIR, "cardcheck development banks CA", BANK_IDENTITIES),
    ):
        private_directory(directory)
        had_ca = (directory / "ca.pem").is_file()
        ca = _authority(directory, common_name, now)
        if not had_ca:
            written.append(directory / "ca.pem")
        for name in names:
            if renew or not had_ca or not all((directory / f"{name}{ext}").is_file() for ext in (".pem", ".key")):
                write_identity(directory, ca, name, now)
                written += [directory / f"{name}.pem", directory / f"{name}.key"]
    return written
