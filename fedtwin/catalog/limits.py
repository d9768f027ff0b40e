"""What one peer may hold of the catalog server: open streams per certificate, open streams
in all, and how long a stream may stall.

The server answers each call on a worker thread, and a pull holds its thread for as long as
the researcher takes to read it: a client that opens pulls and reads nothing would
otherwise hold every thread, and nobody else could even list the catalog. So a certificate
may have at most ``per_peer`` pulls and publishes open at once, all peers together at most
``total`` (fewer than the server's threads, so listing always has some), and a stream that
moves no data for ``stall_s`` seconds is cancelled (a pull resumes where it stopped).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import grpc

log = logging.getLogger(__name__)


class Stream:
    """One open pull or publish; ``moved()`` after every chunk sent or received."""

    def __init__(self, guard: StreamGuard, peer: str, context: grpc.ServicerContext):
        self.guard, self.peer, self.context = guard, peer, context
        self.last = time.monotonic()

    def moved(self) -> None:
        self.last = time.monotonic()


class StreamGuard:
    """Counts open streams per peer and cancels stalled ones (see the module docstring)."""

    def __init__(self, *, per_peer: int, total: int, stall_s: float):
        if per_peer < 1 or total < 1 or not stall_s > 0:
            raise ValueError(
                f"stream limits must be positive: {per_peer} per peer, {total} in all, "
                f"stall timeout {stall_s} s"
            )
        self.per_peer, self.total, self.stall_s = per_peer, total, stall_s
        self._lock = threading.Lock()
        self._open: dict[int, Stream] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._watch, name="stream-guard", daemon=True).start()

    def open(self, peer: str, context: grpc.ServicerContext) -> Stream:
        """Count a new stream of ``peer`` (a certificate's name); ends the call with
        RESOURCE_EXHAUSTED when the peer, or the server, has no stream left."""
        with self._lock:
            mine = sum(s.peer == peer for s in self._open.values())
            full = len(self._open) >= self.total
            if mine < self.per_peer and not full:
                key, stream = next(self._ids), Stream(self, peer, context)
                self._open[key] = stream
        if mine >= self.per_peer:
            log.warning("refused a stream of %s: %d already open", peer, mine)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{peer} already has {mine} pulls or publishes open, the most one certificate "
                f"may have; wait for one to finish",
            )
        if full:
            log.warning("refused a stream of %s: %d open in all", peer, self.total)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the catalog is serving {self.total} pulls or publishes, its most; try again "
                f"in a minute",
            )
        if not context.add_callback(lambda: self._close(key)):
            self._close(key)  # the call has ended already
        return stream

    def _close(self, key: int) -> None:
        with self._lock:
            self._open.pop(key, None)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.stall_s / 4))
            now = time.monotonic()
            with self._lock:
                stalled = [s for s in self._open.values() if now - s.last > self.stall_s]
            for stream in stalled:
                log.warning(
                    "cancelled a stream of %s: no data moved for %.0f s", stream.peer, self.stall_s
                )
                stream.moved()  # cancelled once; the callback removes it
                stream.context.cancel()
