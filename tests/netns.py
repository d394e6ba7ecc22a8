"""Network namespaces joined to this one by a veth pair: a second host on one machine, for the
partition tests and for benchmarks/overlap.py's shaped links. Needs root and `ip netns`."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from typing import Iterator


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"pscheck{uuid.uuid4().hex[:6]}"
    ok = ip("netns", "add", name, check=False).returncode == 0
    ip("netns", "del", name, check=False)
    return ok


@contextmanager
def veth_namespace(host_ip: str, ns_ip: str, rate: str = "") -> Iterator[tuple[str, str]]:
    """A namespace whose end of the pair has `ns_ip`, this side `host_ip` (both /24); with
    `rate` (e.g. "1gbit") both directions are shaped to it (tc tbf). Yields (namespace name,
    the namespace's link name)."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"psw{tag}", f"psh{tag}", f"psn{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        if rate:
            shape = ["root", "tbf", "rate", rate, "burst", "1mb", "latency", "50ms"]
            subprocess.run(["tc", "qdisc", "add", "dev", host_if, *shape], check=True, capture_output=True)
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_if, *shape], check=True,
                           capture_output=True)
        yield ns, ns_if
    finally:
        ip("link", "del", host_if, check=False)
        ip("netns", "del", ns, check=False)
