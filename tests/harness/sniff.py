"""What crosses a network namespace's interface: a packet socket opened inside it, bound to one
interface, keeps every frame on a thread of the test process; once done, it looks for known byte
strings in them.

    with Sniffer(node, patterns) as sniffer:
        ...  # traffic
    sniffer.found  # indices of the patterns seen in some frame

Frames the socket could not keep up with are dropped by the kernel (counted in ``dropped``), so a
pattern not found is evidence only when none was dropped, next to a control run in which the same
traffic in the clear is found.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence

from harness.netns import Namespace

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
# a veth passes TCP segments of up to 64 KiB in one frame (GSO)
FRAME_LIMIT = 256 * 1024
MAX_SECONDS = 120.0


class Sniffer:
    """Looks for each of ``patterns`` in the frames crossing ``interface`` of ``namespace`` while in use."""

    def __init__(self, namespace: Namespace, patterns: Sequence[bytes], interface: str = "eth0") -> None:
        self.namespace = namespace
        self.interface = interface
        self.patterns = list(patterns)
        self.found: set[int] = set()
        self.frames = 0
        self.bytes = 0
        self.dropped = 0
        self._frames: list[bytes] = []
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sniffer:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024 * 1024)
            sock.bind((self.interface, ETH_P_ALL))
            sock.settimeout(0.2)
            return sock

        self._socket = self.namespace.call(open_socket)
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._socket is not None
        deadline = time.monotonic() + MAX_SECONDS  # bounded even if the test never leaves its block
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                frame = self._socket.recv(FRAME_LIMIT)
            except TimeoutError:
                continue
            except OSError:
                return
            self._frames.append(frame)  # searched afterwards: a search per frame here would drop frames

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.3)  # the last frames of the traffic are still in the socket's queue
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._socket is not None:
            # struct tpacket_stats: packets seen, packets dropped
            try:
                stats = self._socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
                self.dropped = struct.unpack("II", stats)[1]
            except OSError:
                pass
            self._socket.close()
        self.frames = len(self._frames)
        self.bytes = sum(len(frame) for frame in self._frames)
        for index, pattern in enumerate(self.patterns):
            if any(pattern in frame for frame in self._frames):
                self.found.add(index)
        self._frames.clear()
