"""Ends every process of a multi-host run, in bounded time and with one line, when another process dies.

Each process writes a counter under its own key in the coordination service's key-value store (JAX's distributed
client) every `timeout_s / 10` seconds, and reads the others'. A process whose counter has not moved for
`timeout_s` is dead, frozen or cut off; one whose key says `failed` stopped with an error of its own. Either way
this process prints one line naming that process and what this one was doing (`set_phase`), then `os._exit(1)`.

Why a watch of our own, in Python threads, and `os._exit`:
- A collective blocked on a dead peer cannot be interrupted from Python (gloo waits in C++), and no exception
  reaches the main thread while the peer's sockets stay open (a dead host, a frozen process). Only another
  thread can end the process, and only with `os._exit`: `sys.exit` from a thread ends the thread alone.
- JAX's coordination service detects a dead process too (heartbeats), but its only reaction is to abort every
  other process with a C++ fatal log and stack trace (a Python callback cannot be given: the client's status
  argument does not convert). `distributed.initialize` sets that heartbeat timeout to 3 x `timeout_s`, so this
  watch, at `timeout_s` (+ one interval), speaks first, and JAX's abort stays the backstop. (At 1.5 x the
  service won the race under load: it counts from a peer's last heartbeat, sent up to its interval before
  the peer died.)
- A peer's key counts while its process runs Python at all: the beat thread needs the GIL only briefly, and JAX
  releases it while it computes, compiles or waits. A process that holds the GIL for `timeout_s` counts as dead.

What it cannot soften: when process 0 dies, the coordination service it hosts dies with it, and JAX aborts the
others at once (its error poll fails), with its own message ("Terminating process because the JAX distributed
service detected fatal errors ... the leader task was preempted/died"). That is immediate, not one line. For the
same reason, process 0 ending on an error of its own (or its verdict) waits, up to `timeout_s`, for every peer
still beating to write `exited` before it ends (`end`): else its exit would abort the peers mid-line.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_KEY = "sft_jax/alive/{}"
_FAILED, _EXITED = "failed ", "exited "  # prefixes of a key's value: the process's error; it is ending now


def _first_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).strip().splitlines()[:1])
    return line if len(line) <= limit else line[:limit - 3] + "..."


class PeerWatch:
    """The watch of one process (`start()` it once, right after `jax.distributed.initialize`)."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, on_verdict=None):
        """`client()`: JAX's distributed client, or None once JAX has shut it down (the run is over: the watch
        stops). `on_verdict(message)` ends the process (by default: prints the line, `os._exit(1)`)."""
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout_s = float(timeout_s)
        self.interval = min(max(self.timeout_s / 10, 0.2), 10.0)
        self.peers = [p for p in range(num_processes) if p != process_id]
        self.phase = "setting up"
        self.note = ""  # what this process saw go wrong, added to the verdict (e.g. a failed collective)
        self._failure = ""  # this process's own error, for the others
        self._exiting = False  # `end` has begun: the key says `exited`
        self._count = 0
        now = time.monotonic()
        self._seen = {p: (None, now) for p in self.peers}  # peer -> (last value, monotonic time it changed)
        self._last_reply = now  # the coordination service answered
        self._verdict = threading.Event()
        self._on_verdict = on_verdict or self.end
        self._lock = threading.Lock()
        self.stopped = False

    def start(self) -> PeerWatch:
        threading.Thread(target=self._beat_forever, name="sft_jax-peer-beat", daemon=True).start()
        threading.Thread(target=self._judge_forever, name="sft_jax-peer-watch", daemon=True).start()
        return self

    # The RPCs run in one thread and the judging in another: an RPC to a frozen coordinator can block for long.
    def _beat_forever(self) -> None:
        while not self.stopped:
            self.beat()
            time.sleep(self.interval)

    def beat(self) -> None:
        """Writes this process's key and reads the others' once."""
        client = self.client()
        if client is None:  # JAX's shutdown at exit has passed its barrier: every process got there
            self.stopped = True
            return
        with self._lock:
            self._count += 1
            value = f"{_FAILED}{self._failure}" if self._failure else str(self._count)
            if self._exiting:
                value = _EXITED + (value if self._failure else "")
        try:
            client.key_value_set(_KEY.format(self.process_id), value, allow_overwrite=True)
            for p in self.peers:
                try:
                    seen = client.key_value_try_get(_KEY.format(p))
                except Exception:  # not written yet (NOT_FOUND): the peer's clock runs from the start
                    continue
                with self._lock:
                    if seen != self._seen[p][0]:
                        self._seen[p] = (seen, time.monotonic())
            self._last_reply = time.monotonic()
        except Exception:  # the service is unreachable: `verdict` counts the silence
            pass

    def _judge_forever(self) -> None:
        while not self._verdict.is_set():
            time.sleep(self.interval)
            if self.client() is None:
                return
            reason = self.verdict()
            if reason is not None and not self._failure:  # this process is ending on its own error line
                self._verdict.set()
                self._on_verdict(self.message(reason))

    def verdict(self, now: float | None = None) -> str | None:
        """What went wrong with another process, or None while all answer."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = dict(self._seen)
        n = self.num_processes
        for p, (value, _) in seen.items():
            value = (value or "").removeprefix(_EXITED)
            if value.startswith(_FAILED):
                return f"process {p} of {n} stopped with an error: {value[len(_FAILED):] or '(see its output)'}"
        for p, (value, _) in seen.items():
            if (value or "").startswith(_EXITED):  # it ended on another process's verdict, which it printed
                return f"process {p} of {n} stopped (see its output for why)"
        for p, (_, changed) in seen.items():
            if now - changed > self.timeout_s:
                return (f"process {p} of {n} sent no heartbeat for {now - changed:.0f} s "
                        f"(config.distributed.timeout_s={self.timeout_s:g}): it died, froze or lost the network")
        if now - self._last_reply > self.timeout_s:
            return (f"the coordination service (process 0 of {n}) has not answered for {now - self._last_reply:.0f} "
                    f"s (config.distributed.timeout_s={self.timeout_s:g}): process 0 died or the network failed")
        return None

    def message(self, reason: str) -> str:
        note = f"; {self.note}" if self.note else ""
        return (f"error: {reason}, while process {self.process_id} was at {self.phase}{note}. Rerun all "
                f"{self.num_processes} processes with the same command to resume from the last complete checkpoint")

    def announce_failure(self, message: str) -> None:
        """Tells the others that this process is ending on an error (they stop at once instead of after
        `timeout_s`); the key is written before this returns, if the service answers."""
        with self._lock:
            self._failure = _first_line(message.removeprefix("error: "))
        self.beat()

    def wait_for_verdict(self, seconds: float) -> bool:
        """Waits until the watch has judged another process dead (it then ends this process), at most `seconds`;
        False when every other process kept answering."""
        return self._verdict.wait(seconds)

    def end(self, message: str) -> None:
        """Prints `message` and ends the process with status 1 (from any thread; see the module docstring), after
        writing `exited` to its key; process 0 first waits for the peers (`wait_for_peers_to_end`)."""
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.mark_exited()
        if self.process_id == 0:
            self.wait_for_peers_to_end(self.timeout_s)
        os._exit(1)

    def mark_exited(self) -> None:
        """Writes `exited` (with this process's error, if it had one) to its key: it ends right after."""
        with self._lock:
            self._exiting = True
        self.beat()

    def wait_for_peers_to_end(self, seconds: float) -> bool:
        """Process 0, ending: waits, at most `seconds`, until every peer that still beats has written `exited`,
        then a moment more for it to be gone. False on the timeout."""
        deadline = time.monotonic() + seconds
        poll = min(self.interval, 0.1)
        while time.monotonic() < deadline:
            self.beat()
            now = time.monotonic()
            with self._lock:
                waiting = [p for p, (value, changed) in self._seen.items()
                           if not (value or "").startswith(_EXITED) and now - changed <= self.timeout_s]
            if not waiting:
                time.sleep(poll)  # `exited` is written just before the peer's own `os._exit`
                return True
            time.sleep(poll)
        return False
