"""A TCP forwarder on loopback between one client and one server, whose link the test can cut:
while cut, open connections are reset and new ones are accepted and closed at once, as when a
network partition separates that pair only (the server itself stays up for everyone else)."""

from __future__ import annotations

import socket
import struct
import threading


class Proxy:
    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._cut or self._closed:
                    _reset(conn)
                    continue
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    _reset(conn)
                    continue
                self._open += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True, name="proxy-pump").start()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until `restore`."""
        with self._lock:
            self._cut = True
            for s in self._open:
                _reset(s)
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        self._listener.close()


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a broken path would, not an orderly FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked reading it
    except OSError:
        pass
    s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
