"""Certificates for TLS listeners: a development CA and realm certificates it signs.

The realm itself never handles certificates: it listens on Twisted ``ssl:`` endpoint
descriptions (``--listen`` or the ``[tls]`` config table, see
:meth:`chatproto.config.Config.listen_descriptions`) and clients verify the realm's
name with :func:`chatproto.client.endpoint_for` against a CA file.  This module makes
the files those two sides need when no public CA is involved (a laptop, a test, a
private deployment): ``chatrealmctl gen-certs`` calls :func:`write_dev_certs`, and tests
call it directly.  Realm certificates carry both the serverAuth and the clientAuth
usage because federation links authenticate both ends with the same certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import platform
import tempfile
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chatproto.address import normalise_realm
from chatproto.errors import ChatError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "VALIDITY_DAYS",
    "TLSFileError",
    "certificate_names",
    "fingerprint",
    "generate_ca",
    "generate_cert",
    "normalise_fingerprint",
    "server_description",
    "write_dev_certs",
]

#: Validity of generated certificates: the longest that Apple platforms accept for
#: TLS server certificates (825 days), so a dev CA is not silently rejected there.
VALIDITY_DAYS = 825
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
#: Backdating of ``notBefore``, so a peer whose clock is a little behind accepts it.
_BACKDATE = datetime.timedelta(hours=1)

_IPGeneralName = ipaddress.IPv4Address | ipaddress.IPv6Address


class TLSFileError(Exception):
    """Certificate files that cannot be used (missing key, mismatched CA...)."""


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _signing_hash(key: object) -> hashes.SHA256 | None:
    # Ed25519/Ed448 keys sign without a separate digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - _BACKDATE, now + datetime.timedelta(days=VALIDITY_DAYS)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signing only (ECDSA); a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def generate_ca(common_name: str) -> tuple[bytes, bytes]:
    """Make a self-signed CA (EC P-256); returns ``(cert_pem, key_pem)``.

    The CA may sign end-entity certificates only (``pathLength=0``).
    """
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chatproto development CA"),
        ]
    )
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _general_name(text: str) -> x509.GeneralName:
    try:
        ip: _IPGeneralName = ipaddress.ip_address(text)
    except ValueError:
        try:
            return x509.DNSName(normalise_realm(text))
        except ChatError as e:
            raise ValueError(f"{text!r} is neither a DNS name nor an IP address") from e
    return x509.IPAddress(ip)


def generate_cert(
    realm_name: str,
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    extra_names: Iterable[str] = (),
) -> tuple[bytes, bytes]:
    """Make a realm certificate (EC P-256) signed by the given CA.

    The subjectAltName holds the realm name, then ``extra_names`` (DNS names or IP
    addresses); a ``localhost`` realm also gets 127.0.0.1 and ::1 so clients that
    connect by address verify too.  Returns ``(cert_pem, key_pem)``; raises
    ``ValueError`` for a bad name and :class:`TLSFileError` for an unusable CA.
    """
    realm = normalise_realm(realm_name) if realm_name else ""
    if not realm:
        raise ValueError("a realm name is required")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSFileError(f"cannot load the CA certificate or key: {e}") from None
    ca_public = ca_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if (
        ca_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != ca_public
    ):
        raise TLSFileError("the CA key does not belong to the CA certificate")

    names: list[x509.GeneralName] = [x509.DNSName(realm)]
    extras = list(extra_names)
    if realm == "localhost":
        extras += ["127.0.0.1", "::1"]
    for extra in extras:
        general = _general_name(extra)
        if general not in names:
            names.append(general)

    key = _new_key()
    not_before, not_after = _validity()
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, realm)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, _signing_hash(ca_key))  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _write(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, the file having ``mode`` from the start."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pem")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_dev_certs(
    directory: str,
    realm: str,
    extra_names: Iterable[str] = (),
    *,
    new_ca: bool = False,
) -> dict[str, str]:
    """Write a development CA (once) and a certificate for ``realm`` into ``directory``.

    Files: ``ca.pem`` (give it to clients as ``ca=``), ``ca.key``, ``REALM.pem`` (the
    realm's certificate; the CA is the trust root, so no chain is needed) and
    ``REALM.key``.  Keys are written mode 0600.  An existing CA is reused to sign the
    new certificate -- so several realms on one machine share one CA that clients trust
    -- unless ``new_ca`` is true.  Existing realm files are replaced.

    Returns absolute paths under the keys ``ca``, ``ca_key``, ``cert`` and ``key``.
    Raises ``ValueError`` for bad names, :class:`TLSFileError` for an unusable
    existing CA and ``OSError`` for I/O.
    """
    realm = normalise_realm(realm)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ca_path = os.path.join(directory, CA_CERT_FILE)
    ca_key_path = os.path.join(directory, CA_KEY_FILE)
    have_cert, have_key = os.path.exists(ca_path), os.path.exists(ca_key_path)
    if have_cert and have_key and not new_ca:
        with open(ca_path, "rb") as f:
            ca_cert_pem = f.read()
        with open(ca_key_path, "rb") as f:
            ca_key_pem = f.read()
    elif (have_cert or have_key) and not new_ca:
        missing = ca_key_path if have_cert else ca_path
        raise TLSFileError(
            f"{missing} is missing: cannot reuse the CA in {directory} (ask for a new CA)"
        )
    else:
        ca_cert_pem, ca_key_pem = generate_ca(
            f"chatproto dev CA ({platform.node() or 'localhost'})"
        )
        _write(ca_key_path, ca_key_pem, 0o600)
        _write(ca_path, ca_cert_pem, 0o644)
    cert_pem, key_pem = generate_cert(realm, ca_cert_pem, ca_key_pem, extra_names)
    cert_path = os.path.join(directory, f"{realm}.pem")
    key_path = os.path.join(directory, f"{realm}.key")
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    return {
        "ca": ca_path,
        "ca_key": ca_key_path,
        "cert": cert_path,
        "key": key_path,
    }


def _escape(path: str) -> str:
    # Endpoint descriptions separate fields with ':'; a path may contain one.
    return path.replace("\\", "\\\\").replace(":", "\\:")


def server_description(cert: str, key: str, port: int, interface: str = "127.0.0.1") -> str:
    """The Twisted ``ssl:`` server endpoint description for a certificate and key."""
    return (
        f"ssl:{port}:interface={_escape(interface)}"
        f":privateKey={_escape(key)}:certKey={_escape(cert)}"
    )


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """The SHA-256 fingerprint of a certificate (object or PEM) as ``sha256:<hex>``:
    the form ``[[federation.peers]] fingerprint`` pins."""
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def normalise_fingerprint(text: str) -> str:
    """``sha256:AB:CD...`` (any case, colons optional) -> ``sha256:abcd...``; raises
    ``ValueError`` for anything else."""
    algo, sep, digest = text.strip().partition(":")
    if not sep or algo.lower() != "sha256":
        raise ValueError(f"fingerprint {text[:80]!r} must start with 'sha256:'")
    digest = digest.replace(":", "").lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"fingerprint {text[:80]!r}: expected 32 bytes of hex after sha256:")
    return "sha256:" + digest


def certificate_names(path: str) -> list[str]:
    """The DNS names in the subjectAltName of the (first) certificate in ``path``;
    raises ``ValueError`` when the file holds no readable certificate."""
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{path} holds no PEM certificate ({e})") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
