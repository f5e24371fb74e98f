"""Failures across ranks: heartbeats and failure notices through the rendezvous store."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from datetime import timedelta
from types import TracebackType

from torch._C._distributed_c10d import PrefixStore, TCPStore

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.dist.layout import Layout
from tspipe_fx.runtime.tasks import RuntimeFailure

__all__ = ["PeerLost", "Watchdog"]


class PeerLost(TspipeError):
    """Another rank went away while this one exchanged messages with it."""


class Watchdog:
    """Heartbeats and failure notices through the rendezvous store, on a daemon thread.

    A rank that fails posts ``rank R (stage S) failed: ...``; every other rank, blocked or not,
    sees it within ``poll_s`` and ends its process with exit code 1 and that message. A rank
    whose heartbeat stops for ``dead_after_s`` (killed, or its machine gone) is reported as such.
    A rank that ends normally says so first, and is no longer watched.
    """

    def __init__(self, layout: Layout, *, poll_s: float = 0.5, dead_after_s: float = 20.0):
        self.layout, self.poll_s, self.dead_after_s = layout, poll_s, dead_after_s
        prefix = f"tspipe_fx/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self._main = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60)))
        # The thread has its own connection: a store client is not shared across threads.
        self._own = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tspipe-watchdog", daemon=True)
        self._thread.start()
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self.close)

    def fail(self, message: str, *, wait_s: float = 5.0) -> None:
        """Tell every rank that this one failed (the first notice wins), and give them up to
        ``wait_s`` to read it before this process goes on to exit (torchrun ends the others
        when it sees one exit, which could otherwise cut their own word short)."""
        try:
            self._main.compare_set(
                "failed", "", f"rank {self.layout.rank} (stage {self.layout.stage}) failed: {message}"
            )
            deadline = time.monotonic() + wait_s
            while self._main.add("read", 0) < self.layout.world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store may be gone with the failure; the heartbeat tells then
            pass

    def notice(self) -> str | None:
        """The failure another rank posted, if any (waits a moment: it may be on its way)."""
        for _ in range(int(2 / self.poll_s) + 1):
            try:
                if self._main.check(["failed"]):
                    text = self._main.get("failed").decode()
                    return None if text.startswith(f"rank {self.layout.rank} ") else text
            except Exception:  # noqa: BLE001 - no store, no notice
                return None
            time.sleep(self.poll_s)
        return None

    def close(self) -> None:
        """This rank ends normally: stop watching and say so."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._main.set(f"done/{self.layout.rank}", "1")
        except Exception:  # noqa: BLE001 - at exit, nothing left to tell
            pass
        self._thread.join(timeout=5 * self.poll_s + 5)

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(value, RuntimeFailure):  # a runtime failure was posted where it happened
            self.fail(f"{kind.__name__}: {value}")
        self._previous_hook(kind, value, tb)

    def _watch(self) -> None:
        me = self.layout.rank
        others = [r for r in range(self.layout.world) if r != me]
        seen = {r: (-1, time.monotonic()) for r in others}
        while not self._stop.wait(self.poll_s):
            try:
                self._own.add(f"beat/{me}", 1)
                if self._own.check(["failed"]):
                    notice = self._own.get("failed").decode()
                    if notice.startswith(f"rank {me} "):
                        return  # this rank's own failure: its main thread reports and exits
                    self._end(notice)
                now = time.monotonic()
                for r in others:
                    if self._own.check([f"done/{r}"]):
                        continue
                    beat = self._own.add(f"beat/{r}", 0)
                    if beat != seen[r][0]:
                        seen[r] = (beat, now)
                    elif now - seen[r][1] > self.dead_after_s:
                        self._own.compare_set(
                            "failed",
                            "",
                            f"rank {r} stopped answering for {self.dead_after_s:.0f} s (killed, or its machine is gone)",
                        )
            except Exception as e:  # noqa: BLE001 - the store lives with torchrun's agent; it went away
                if self._stop.is_set():
                    return
                self._end(
                    f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} went away ({e})"
                )

    def _end(self, why: str) -> None:
        if self._stop.is_set():
            return
        print(f"tspipe_fx: rank {self.layout.rank} stops: {why}", file=sys.stderr, flush=True)
        try:
            self._own.add("read", 1)  # the failed rank waits for this before it exits
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        os._exit(1)
