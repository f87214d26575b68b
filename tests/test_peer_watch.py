"""The peer watch of a multi-host run (sft_jax/peer_watch.py) judged on a fake coordination service: silence
longer than the timeout, a peer's own error, and an unreachable service each give one line naming the process;
peers that keep beating never do. (The 2-process run with a process killed: tests/test_multihost.py.)"""

from __future__ import annotations

import time

import pytest

from sft_jax.peer_watch import PeerWatch


class FakeService:
    """The key-value calls of JAX's distributed client, on a dict; `down` makes every call fail."""

    def __init__(self):
        self.store, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        self.store[key] = value

    def key_value_try_get(self, key):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        if key not in self.store:
            raise RuntimeError(f"NOT_FOUND: {key}")
        return self.store[key]


def _pair(timeout_s=10.0):
    service = FakeService()
    watches = [PeerWatch(lambda: service, pid, 2, timeout_s, on_verdict=lambda m: None) for pid in range(2)]
    return service, watches


def test_peers_that_beat_are_alive():
    _, (w0, w1) = _pair()
    for _ in range(3):
        w0.beat(), w1.beat()
    assert w0.verdict() is None and w1.verdict() is None
    assert w0.verdict(time.monotonic() + 5) is None  # within the timeout


def test_a_silent_peer_is_named_after_the_timeout():
    _, (w0, w1) = _pair(timeout_s=10)
    w1.beat(), w0.beat()
    w0.phase = "train step 7"
    later = time.monotonic() + 11
    assert w0.verdict(time.monotonic() + 9) is None
    reason = w0.verdict(later)
    assert reason.startswith("process 1 of 2 sent no heartbeat for 11 s") and "timeout_s=10" in reason
    message = w0.message(reason)
    assert "\n" not in message and message.startswith("error: process 1 of 2")
    assert "while process 0 was at train step 7" in message and "Rerun all 2 processes" in message


def test_a_peer_that_never_wrote_is_silent_from_the_start():
    _, (w0, _) = _pair(timeout_s=10)
    w0.beat()
    assert "process 1 of 2" in w0.verdict(time.monotonic() + 11)


def test_a_peer_error_is_reported_at_once():
    _, (w0, w1) = _pair()
    w1.announce_failure("error: data/train.jsonl, line 3: no 'label'")
    w0.beat()
    assert w0.verdict() == "process 1 of 2 stopped with an error: data/train.jsonl, line 3: no 'label'"


def test_an_unreachable_service_is_reported_after_the_timeout():
    service, (w0, w1) = _pair(timeout_s=10)
    w0.beat(), w1.beat()
    service.down = True
    w1.beat()  # the peer's key stays as it was, and so does the time of the service's last answer
    reason = w1.verdict(time.monotonic() + 11)
    assert reason is not None and "process 0 of 2" in reason


def test_the_watch_ends_the_process_once_and_stops_after_shutdown():
    service, reported = FakeService(), []
    client = {"now": service}
    w = PeerWatch(lambda: client["now"], 0, 2, timeout_s=0.3, on_verdict=reported.append).start()
    assert w.wait_for_verdict(5)  # process 1 never beats
    time.sleep(0.2)
    assert len(reported) == 1 and reported[0].startswith("error: process 1 of 2 sent no heartbeat")

    client["now"] = None  # JAX shut its client down at exit: every process passed the shutdown barrier
    quiet = PeerWatch(lambda: client["now"], 0, 2, timeout_s=0.3, on_verdict=reported.append).start()
    assert not quiet.wait_for_verdict(1.0) and len(reported) == 1


@pytest.mark.parametrize("timeout_s, interval", [(300, 10.0), (15, 1.5), (1, 0.2)])
def test_interval_is_a_tenth_of_the_timeout_within_bounds(timeout_s, interval):
    _, (w0, _) = _pair(timeout_s)
    assert w0.interval == interval


def test_process_0_ends_only_after_the_peers_that_still_beat_have_ended():
    """Process 0 hosts the coordination service: its exit aborts every peer still running (JAX's C++ abort), so
    an ending process 0 waits for the others' `exited`; a peer silent past the timeout is not waited for."""
    _, (w0, w1) = _pair(timeout_s=0.5)
    w1.beat()
    assert not w0.wait_for_peers_to_end(0.3)  # process 1 beats and has not ended
    w1.announce_failure("error: data/train.jsonl, line 3: no 'label'")
    w1.mark_exited()
    assert w0.wait_for_peers_to_end(0.3)
    # its error stays readable after `exited`, for the processes that had not read it yet
    assert w0.verdict() == "process 1 of 2 stopped with an error: data/train.jsonl, line 3: no 'label'"

    _, (w0, w1) = _pair(timeout_s=0.2)
    w1.beat()
    time.sleep(0.3)  # process 1 died without a word
    assert w0.wait_for_peers_to_end(1.0)


def test_a_peer_that_ended_on_another_verdict_is_named_as_stopped():
    _, (w0, w1) = _pair()
    w1.mark_exited()
    w0.beat()
    assert w0.verdict() == "process 1 of 2 stopped (see its output for why)"
