"""Federation TLS: one OpenSSL context with the realm's certificate for both
directions, and the check of a peer's certificate after the handshake.

TLS accepts any certificate and records chain errors; :func:`peer_refusal` then
decides (the name with ``service_identity``, a pinned fingerprint or the CA bundle),
so every refusal gets one log line naming its reason (see :mod:`chatproto.federation`).
"""

from __future__ import annotations

from typing import Any

import service_identity
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from chatproto.config import ConfigError, Federation
from chatproto.tls import fingerprint

__all__ = ["FederationTLS", "peer_refusal"]

_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate not in the trusted CA bundle",
    19: "self-signed CA certificate not in the trusted CA bundle",
    20: "issuer not in the trusted CA bundle (untrusted CA)",
    21: "unable to verify the first certificate",
}


def _record_verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL verify callback: accept, but remember on the TLS transport that the
    peer's chain was checked in this handshake, and its first chain error, so
    :func:`peer_refusal` can decide and name it."""
    transport = conn.get_app_data()
    if transport is None:
        return True
    transport.chain_checked = True
    if not ok and transport.chain_error is None:
        transport.chain_error = _VERIFY_ERRORS.get(errno, f"verify error {errno}")
    return True


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class _Creator:
    def __init__(self, ctx: SSL.Context, server_name: str | None) -> None:
        self._ctx = ctx
        self._server_name = server_name

    def _connection(self, tls_protocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tls_protocol)
        tls_protocol.chain_error = None
        tls_protocol.chain_checked = False
        return conn

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = self._connection(tlsProtocol)
        if self._server_name:
            conn.set_tlsext_host_name(self._server_name.encode("ascii"))
        conn.set_connect_state()
        return conn

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = self._connection(tlsProtocol)
        conn.set_accept_state()
        return conn


class FederationTLS:
    """One OpenSSL context with the realm's certificate, for both directions.

    Both sides ask for the other's certificate (``VERIFY_PEER``) and record chain
    errors instead of failing the handshake; :func:`peer_refusal` decides.  No TLS
    session is ever resumed (no session cache, no tickets): a resumed handshake
    checks no chain, and the chain error of the connection that made the session --
    a certificate of an untrusted CA, say -- would be forgotten.
    """

    def __init__(self, cfg: Federation) -> None:
        """Raises :class:`chatproto.config.ConfigError` for files that cannot be used
        (unreadable, not PEM, a key that is not the certificate's, a bad CA bundle)."""
        key_path = cfg.private_key or cfg.certificate
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        try:
            with open(cfg.certificate, "rb") as f:
                cert_pem = f.read()
            with open(key_path, "rb") as f:
                key_pem = f.read()
            ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
            ctx.check_privatekey()
        except (OSError, crypto.Error, SSL.Error) as e:
            raise ConfigError(
                f"federation: cannot use certificate {cfg.certificate} with key {key_path}: {e}"
            ) from None
        if cfg.ca:
            try:
                ctx.load_verify_locations(cfg.ca.encode())
            except (OSError, SSL.Error) as e:
                raise ConfigError(f"federation.ca {cfg.ca}: not a PEM CA bundle ({e})") from None
        ctx.set_verify(SSL.VERIFY_PEER, _record_verify)
        ctx.set_session_id(b"chatproto-federation")
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
        self.context = ctx

    def client(self, realm: str) -> _Creator:
        return _Creator(self.context, realm)

    def server(self) -> _Creator:
        return _Creator(self.context, None)


def peer_refusal(transport: Any, realm: str, cfg: Federation) -> str | None:
    """Why the TLS peer on ``transport`` may not speak for ``realm``, or None.
    ``transport`` is a TLS connection made by this module's connection creator
    (which sets its ``chain_checked`` and ``chain_error``), or None.

    Checks, in order: a certificate was presented, and checked in this very handshake
    (not one of a resumed TLS session, whose chain no one checked here); it names
    ``realm`` (``service_identity``); it matches the fingerprint pinned for ``realm``,
    else it chains to the CA bundle.  A realm with neither a pin nor a CA bundle is
    refused.
    """
    peer_cert = transport.getPeerCertificate() if transport is not None else None
    if peer_cert is None:
        return "presented no certificate"
    if not transport.chain_checked:
        return "resumed a TLS session (its certificate was not checked in this handshake)"
    cert: x509.Certificate = peer_cert.to_cryptography()
    try:
        verify_certificate_hostname(cert, realm)
    except service_identity.VerificationError:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        return f"certificate is for {', '.join(names) or 'no DNS name'}, not {realm}"
    except service_identity.CertificateError as e:
        return f"certificate unusable: {e}"
    peer = cfg.peer(realm)
    if peer is not None and peer.fingerprint:
        got = fingerprint(cert)
        if got != peer.fingerprint:
            return f"certificate fingerprint {got} is not the pinned {peer.fingerprint}"
        return None
    if not cfg.ca:
        return "no trust for this realm (no CA bundle and no pinned fingerprint)"
    error = transport.chain_error
    if error:
        return f"certificate not trusted: {error}"
    return None
