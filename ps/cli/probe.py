"""Health probe for containers: exit 0 when a ps-server answers SERVING to the standard gRPC
health check, 1 otherwise (the Dockerfile's HEALTHCHECK and the Kubernetes probes run it).

    python -m ps.cli.probe [--address 127.0.0.1:5000] [--service ps.ParameterServer]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps import tls, wire
from ps.errors import PSError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ps.cli.probe", description=__doc__.splitlines()[0])
    port = os.environ.get("PS_PORT", "5000")
    p.add_argument("--address", default=f"127.0.0.1:{port}", help="server to check (default: 127.0.0.1:$PS_PORT)")
    p.add_argument("--service", default=wire.SERVICE, help="service name to check ('' for the whole server)")
    p.add_argument("--timeout", default=3.0, type=float, help="seconds")
    # A server serving TLS is probed over TLS, as a client: the CA that signed the server's
    # certificate and, under mutual TLS, a client certificate (not the server's own settings).
    for flag in ("ca", "cert", "key"):
        var = f"PS_PROBE_TLS_{flag.upper()}"
        p.add_argument(f"--tls-{flag}", default=os.environ.get(var, ""), help=f"PEM {flag} as a TLS client [env {var}]")
    p.add_argument("--tls-server-name", default=os.environ.get("PS_PROBE_TLS_SERVER_NAME", ""),
                   help="name to check the server's certificate against, when it does not name 127.0.0.1 "
                        "[env PS_PROBE_TLS_SERVER_NAME]")
    return p


def check(address: str, service: str = wire.SERVICE, timeout: float = 3.0, ca: str = "", cert: str = "",
          key: str = "", server_name: str = "") -> str:
    """The serving status name (SERVING, NOT_SERVING, ...), or the gRPC error code's name."""
    options = (("grpc.ssl_target_name_override", server_name),) if server_name else ()
    with tls.channel(address, options, ca, cert, key) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key,
                       args.tls_server_name)
    except PSError as e:  # bad TLS settings: unhealthy, with the reason
        status = f"ERROR {e}"
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
