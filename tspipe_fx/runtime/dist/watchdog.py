"""Failures across ranks: heartbeats and failure notices through the rendezvous store.

torchrun names as the "Root Cause" the failed worker with the earliest timestamp, read from the
error file each worker may write (``TORCHELASTIC_ERROR_FILE``). A rank that fails writes its own
at the time of the failure; a rank that ends because of another's failure writes one a second
later that names the cause, so torchrun's box names the rank that failed, and on a machine
without it, the peer that saw it go. A rank that stops answering (stopped, or its machine gone)
is named by the peers that notice; one on their own machine is killed, so torchrun need not wait
out its grace period for it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
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

    def __init__(self, message: str, rank: int, where: str):
        super().__init__(message)
        self.rank, self.where = rank, where  # where: its stages, in words ("stage 1")


def _write_error_file(path: str, message: str, timestamp: int) -> None:
    """A torchelastic error file (the format of ``torch.distributed.elastic``'s ``@record``),
    written whole or not at all: torchrun may read it the moment the rank exits, and another rank
    may write it too (a silent peer's), so it is written aside and renamed into place."""
    if not path:
        return
    aside = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(aside, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(timestamp)}}}, f)  # fmt: skip
        os.replace(aside, path)
    except OSError:
        pass  # torchrun then names this rank by the time it saw it exit


def _claim(store: PrefixStore, notice: str, now: int) -> str:
    """Post ``notice`` as the run's failure, with its time, unless one came first; the one posted."""
    posted = store.compare_set("failed", "", notice).decode()
    if posted == notice:
        store.set("failed_at", str(now))
    return posted


class Watchdog:
    """Heartbeats and failure notices through the rendezvous store, on a daemon thread.

    A rank that fails posts ``rank R (stage S) failed: ...``; every other rank, blocked or not,
    sees it within ``poll_s`` and ends its process with exit code 1 and that message. A rank
    whose heartbeat stops for ``dead_after_s`` (killed, or its machine gone) is reported as such.
    A rank that ends normally says so first, and is no longer watched.
    """

    def __init__(self, layout: Layout, *, poll_s: float = 0.5, dead_after_s: float = 10.0):
        self.layout, self.poll_s, self.dead_after_s = layout, poll_s, dead_after_s
        prefix = f"tspipe_fx/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self._main = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60)))
        # The thread has its own connection: a store client is not shared across threads.
        self._own = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60)))
        self._error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
        self._main.set(f"proc/{layout.rank}", json.dumps([socket.gethostname(), os.getpid(), self._error_file]))
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
        self._post(f"rank {self.layout.rank} ({self.layout.where(self.layout.rank)}) failed: {message}", wait_s, readers=1)

    def lost(self, peer: PeerLost, *, wait_s: float = 5.0) -> None:
        """Tell every rank that ``peer``'s rank went away while this one exchanged messages with it."""
        self._post(f"rank {peer.rank} ({peer.where}) was lost: rank {self.layout.rank} {peer}", wait_s, readers=2)

    def _post(self, notice: str, wait_s: float, *, readers: int) -> None:
        """Post ``notice`` (unless another came first), write this rank's error file, and wait up to
        ``wait_s`` until the ranks other than ``readers`` of them have read it."""
        now = int(time.time())
        try:
            posted = _claim(self._main, notice, now)
        except Exception:  # noqa: BLE001 - the store may be gone with the failure; the heartbeat tells then
            posted = notice
        mine = posted.startswith(f"rank {self.layout.rank} ")
        _write_error_file(self._error_file, posted if mine else f"rank {self.layout.rank} stops: {posted}",
                          now if mine else now + 1)  # fmt: skip
        try:
            deadline = time.monotonic() + wait_s
            while self._main.add("read", 0) < self.layout.world - readers and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - no store: nobody left to read it
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
                        self._silent(r)
            except Exception as e:  # noqa: BLE001 - the store lives with torchrun's agent; it went away
                if self._stop.is_set():
                    return
                self._end(
                    f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} went away ({e})"
                )

    def _silent(self, r: int) -> None:
        """Rank ``r``'s heartbeat stopped: name it; on this machine, write its error file and kill
        it (a stopped process cannot take torchrun's SIGTERM, which would wait 30 s for it)."""
        notice = (
            f"rank {r} ({self.layout.where(r)}) stopped answering for {self.dead_after_s:.0f} s "
            "(stopped, hung outside Python, killed, or its machine is gone)"
        )
        now = int(time.time())
        if _claim(self._own, notice, now) != notice:
            return  # another notice came first
        host, pid, error_file = json.loads(self._own.get(f"proc/{r}").decode())
        if host == socket.gethostname():
            _write_error_file(error_file, notice, now)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone already

    def echo(self, notice: str, *, store: PrefixStore | None = None, wait_s: float = 10.0) -> None:
        """This rank ends because of another's ``notice``: its error file names the cause, a
        second after it; the failed rank hears it was read, and, on this machine, exits first."""
        store = store or self._main
        try:
            at = int(store.get("failed_at").decode()) if store.check(["failed_at"]) else int(time.time())
            store.add("read", 1)  # the failed rank waits for this before it exits
            culprit = re.match(r"rank (\d+) ", notice)
            host, pid, _ = json.loads(store.get(f"proc/{culprit.group(1)}").decode()) if culprit else ("", 0, "")
        except Exception:  # noqa: BLE001 - the store went away: now is as good, and nobody to wait for
            at, host, pid = int(time.time()), "", 0
        _write_error_file(self._error_file, f"rank {self.layout.rank} stops: {notice}", at + 1)
        deadline = time.monotonic() + wait_s
        while host == socket.gethostname() and pid != os.getpid() and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break  # torchrun has seen the failed rank exit before this one
            time.sleep(0.05)

    def _end(self, why: str) -> None:
        if self._stop.is_set():
            return
        print(f"tspipe_fx: rank {self.layout.rank} stops: {why}", file=sys.stderr, flush=True)
        self.echo(why, store=self._own)
        os._exit(1)
