"""A loopback TCP proxy in front of a real redis-server that can hold back one reply.

It makes the fault a timeout-and-retry policy has to survive: the command reaches
Redis and runs, but its reply arrives after the client's read timeout, so the client
(redis-py's Retry) sends it again.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class SlowReplyProxy:
    """Forwards 127.0.0.1:<port> to ``target_port``; :meth:`delay_next_reply` holds back
    the reply to the next request whose bytes contain ``marker``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._armed: tuple[bytes, float] | None = None
        self._lock = threading.Lock()
        #: set when a reply starts being held back
        self.delayed = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def delay_next_reply(self, marker: bytes, seconds: float) -> None:
        with self._lock:
            self._armed = (marker.upper(), seconds)

    def close(self) -> None:
        self._stop.set()
        with suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            hold = threading.Event()
            held_for: list[float] = []
            threading.Thread(
                target=self._pump_up, args=(client, upstream, hold, held_for), daemon=True
            ).start()
            threading.Thread(
                target=self._pump_down, args=(upstream, client, hold, held_for), daemon=True
            ).start()

    def _pump_up(
        self, src: socket.socket, dst: socket.socket, hold: threading.Event, held_for: list[float]
    ) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    armed = self._armed
                    if armed is not None and armed[0] in data.upper():
                        self._armed = None
                        held_for.append(armed[1])
                        hold.set()
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _pump_down(
        self, src: socket.socket, dst: socket.socket, hold: threading.Event, held_for: list[float]
    ) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                if hold.is_set():
                    hold.clear()
                    self.delayed.set()
                    # The reply is late, not lost: the client has given up on it by then.
                    self._stop.wait(held_for.pop())
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
