"""TLS and mutual TLS credentials from PEM files (--tls-cert, --tls-key, --tls-ca).

Server: cert + key serve TLS; adding a CA requires every client to present a certificate that CA
signed (mutual TLS). Client: a CA verifies the server; cert + key present this client (mTLS).
"""

from __future__ import annotations

import ssl

import grpc

from ps.errors import InvalidArgument


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(f"{what} ({path!r}) cannot be read: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"{what} ({path!r}) is not a PEM file")
    return data


def check(cert: str, key: str, ca: str, server: bool) -> None:
    """The rules for a set of TLS flags; InvalidArgument names the values."""
    if bool(cert) != bool(key):
        raise InvalidArgument(f"tls_cert ({cert!r}) and tls_key ({key!r}) must be given together")
    if server and ca and not cert:
        raise InvalidArgument(f"tls_ca ({ca!r}) on a server needs tls_cert and tls_key (mutual TLS)")
    if not server and cert and not ca:
        raise InvalidArgument(f"a client certificate ({cert!r}) needs tls_ca to verify the servers")


def server_credentials(cert: str, key: str, ca: str = "") -> grpc.ServerCredentials:
    check(cert, key, ca, server=True)
    root = _read(ca, "tls_ca") if ca else None
    return grpc.ssl_server_credentials([(_read(key, "tls_key"), _read(cert, "tls_cert"))],
                                       root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    check(cert, key, ca, server=False)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "tls_ca"), private_key=_read(key, "tls_key") if key else None,
        certificate_chain=_read(cert, "tls_cert") if cert else None)


def channel(address: str, options, ca: str = "", cert: str = "", key: str = "") -> grpc.Channel:
    """A secure channel when a CA is given, else an insecure one."""
    if not ca:
        check(cert, key, ca, server=False)
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(ca, cert, key), options=options)


def aio_channel(address: str, options, ca: str = "", cert: str = "", key: str = "") -> grpc.aio.Channel:
    """`channel` for grpc.aio (create it on the event loop that will use it)."""
    if not ca:
        check(cert, key, ca, server=False)
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, channel_credentials(ca, cert, key), options=options)


def server_ssl_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """The same credentials for a plain socket (ps.tcp's data port): with a CA, clients must
    present a certificate it signed."""
    check(cert, key, ca, server=True)
    _read(cert, "tls_cert"), _read(key, "tls_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if ca:
        _read(ca, "tls_ca")
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client's context for a plain socket: verifies the server (its certificate and host
    name, as gRPC does) against `ca`; presents cert + key when given (mutual TLS)."""
    check(cert, key, ca, server=False)
    _read(ca, "tls_ca")
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        _read(cert, "tls_cert"), _read(key, "tls_key")
        ctx.load_cert_chain(cert, key)
    return ctx
