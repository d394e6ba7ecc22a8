"""Bearer-token authentication of every RPC but the health check (which probes must reach)."""

from __future__ import annotations

import hmac
import logging

import grpc

log = logging.getLogger("ps.server")
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (what PSClient sends)."""
    return (("authorization", f"Bearer {token}"),)


DENIED = "missing or wrong auth token (send 'authorization: Bearer <token>')"


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_stream(requests, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield b""  # never reached: makes this an async generator, as a streaming handler must be


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>`; health checks always pass.
    A refused call never reaches the servicer (its request is not even parsed)."""

    def __init__(self, token: str, on_refuse=lambda: None):
        self._expected = f"Bearer {token}".encode()
        self._denied = grpc.unary_unary_rpc_method_handler(_deny)  # raw bytes in, nothing decoded
        self._denied_stream = grpc.stream_stream_rpc_method_handler(_deny_stream)
        self._on_refuse = on_refuse

    async def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        got = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return await continuation(details)
        self._on_refuse()
        log.warning("refused %s: missing or wrong auth token", details.method)
        return self._denied_stream if details.method.endswith("/Stream") else self._denied
