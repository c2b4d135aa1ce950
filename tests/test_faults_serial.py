"""Unplugging and replugging serial ports under a running edgernnd.

The daemon reads stable symlinks, as it would read udev's /dev/serial/by-id
links; a "replug" closes the pseudo-terminal behind port A (the daemon's read
fails as with an unplugged USB adapter) and points the link at a new one. Port B
streams recordings all along and must not notice.
"""

import inspect
import logging
import socket
import statistics
import threading
import time

import numpy as np
import pytest
from daemon_harness import (
    Daemon,
    PtyPort,
    daemon_config,
    expected_scores,
    metric_sum,
    scores_of,
    wait_metrics,
    write_config,
)

from edgernnd.binary_codec import encode_frame, encode_reset
from edgernnd.manifest import load_manifest
from edgernnd.serial_reader import PortReader

_log = logging.getLogger(__name__)

RECORDINGS = 4
B_STREAMS = 3
B_PERIOD_S = 0.01  # one frame per B stream every 10 ms: 300 frames/s on port B
PROBE_STREAM = 9  # stream on port A whose frames only show the port is back
PROBE_PERIOD_S = 0.002
# What the daemon uses: it builds its PortReaders with the default backoff.
BACKOFF_MAX_S = inspect.signature(PortReader).parameters["backoff_max_s"].default
# Every tenth replug the port stays away longer, so that the backoff grows
# (attempts 0.1, 0.3, 0.7, 1.5 s after the loss: the port is back at 1.5 s).
LONG_OUTAGE_S = 1.0
# Longer than the sum of the doubling waits up to the cap (6.3 s): the cap rules.
CAPPED_OUTAGE_S = 8.0


@pytest.fixture(scope="module")
def recordings(basicmotions_test):
    return [np.asarray(s, np.float32) for s in basicmotions_test.sequences[:RECORDINGS]]


@pytest.fixture(scope="module")
def expected(basicmotions_model, recordings, tmp_path_factory):
    return expected_scores(basicmotions_model, recordings,
                           tmp_path_factory.mktemp("expected"))


class LoopingWriter(threading.Thread):
    """Plays recordings on port B's streams in a loop, a reset frame between
    rounds, until stopped; remembers the seq of every data frame it wrote."""

    def __init__(self, port_b: PtyPort, recordings):
        super().__init__(daemon=True)
        self.port, self.recordings = port_b, recordings
        self.stopping = threading.Event()
        self.data_seqs: dict[int, list[int]] = {s: [] for s in range(B_STREAMS)}

    def run(self):
        seq = dict.fromkeys(range(B_STREAMS), 0)
        start = time.monotonic()
        t = 0
        while not self.stopping.wait(max(0.0, start + t * B_PERIOD_S
                                         - time.monotonic())):
            chunk = []
            for s in range(B_STREAMS):
                recording = self.recordings[s % len(self.recordings)]
                if t and t % len(recording) == 0:
                    chunk.append(encode_reset(s, seq[s]))
                    seq[s] += 1
                chunk.append(encode_frame(s, seq[s], recording[t % len(recording)]))
                self.data_seqs[s].append(seq[s])
                seq[s] += 1
            self.port.write(b"".join(chunk))
            t += 1


def port_records(daemon, port: str, stream: int | None = None) -> list[dict]:
    return [r for r in list(daemon.records)
            if r["port"] == port and (stream is None or r["stream"] == stream)]


def probe_until_prediction(daemon, port: PtyPort, probe_seq: list[int],
                           timeout_s: float) -> float:
    """Writes a frame on the probe stream every PROBE_PERIOD_S until a prediction
    from port "a" arrives; returns the seconds that took."""
    start = time.monotonic()
    seen = len(daemon.records)

    def arrived() -> bool:
        return any(r["port"] == "a" for r in daemon.records[seen:])

    while time.monotonic() - start < timeout_s:
        port.write(encode_frame(PROBE_STREAM, probe_seq[0] % 65536,
                                np.zeros(6, np.float32)))
        probe_seq[0] += 1
        if daemon.wait_until(arrived, PROBE_PERIOD_S):
            return time.monotonic() - start
    raise AssertionError(f"no prediction from port a {timeout_s} s after replug:\n"
                         + "\n".join(daemon.stderr_lines[-10:]))


def run_replugs(model, recordings, expected, tmp_path, cycles: int,
                capped_outage: bool = False) -> dict:
    labels = load_manifest(model).labels
    link_a, link_b = tmp_path / "by-id-a", tmp_path / "by-id-b"
    port_a, port_b = PtyPort(link_a, raw=True), PtyPort(link_b, raw=True)
    textfile = tmp_path / "edgernnd.prom"
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        model, {"a": str(link_a), "b": str(link_b)},
        metrics={"textfile": textfile, "interval_s": 0.2}))
    daemon = Daemon(["--config", str(config)], tmp_path)
    writer = LoopingWriter(port_b, recordings)
    reconnect_s, a0_seq, probe_seq = [], 0, [0]
    try:
        daemon.wait_ready()
        writer.start()
        # Port A's stream 0 runs a recording before the first unplug, so its
        # state is far from zero when the port goes.
        port_a.write(b"".join(encode_frame(0, t, f) for t, f in
                              enumerate(recordings[-1])))
        a0_seq = len(recordings[-1])
        assert daemon.wait_until(lambda: len(port_records(daemon, "a", 0)) == a0_seq)
        fds_before, threads_before = daemon.proc_counts()

        for cycle in range(cycles):
            port_a.close()
            assert daemon.wait_stderr("port a lost", count=cycle + 1)
            # The length of the fault itself, not a wait for something.
            if capped_outage and cycle == 0:
                time.sleep(CAPPED_OUTAGE_S)
            elif cycle % 10 == 9:
                time.sleep(LONG_OUTAGE_S)
            port_a = PtyPort(link_a, raw=True)
            reconnect_s.append(probe_until_prediction(
                daemon, port_a, probe_seq, BACKOFF_MAX_S + 5.0))

            # A recording started after the replug: exactly a fresh stream's.
            index = cycle % len(recordings)
            done = len(port_records(daemon, "a", 0))
            port_a.write(b"".join(encode_frame(0, (a0_seq + t) % 65536, f)
                                  for t, f in enumerate(recordings[index])))
            a0_seq += len(recordings[index])
            assert daemon.wait_until(
                lambda n=a0_seq: len(port_records(daemon, "a", 0)) >= n), (
                    f"replug {cycle}: {len(port_records(daemon, 'a', 0))} of "
                    f"{a0_seq} predictions\n" + "\n".join(daemon.stderr_lines[-8:]))
            got = port_records(daemon, "a", 0)[done:]
            np.testing.assert_allclose(scores_of(got, labels), expected[index],
                                       atol=1e-6, err_msg=f"replug {cycle}")

        fds_after, threads_after = daemon.proc_counts()
        writer.stopping.set()
        writer.join()
        written_b = sum(len(v) for v in writer.data_seqs.values())
        assert daemon.wait_until(lambda: len(port_records(daemon, "b")) >= written_b)
        metrics = wait_metrics(textfile, lambda m: metric_sum(
            m, "edgernn_reconnects_total") >= cycles)
    finally:
        writer.stopping.set()
        code = daemon.stop()
        port_a.close()
        port_b.close()
    assert code == 0, daemon.stderr_text()

    # Port B: every frame predicted once, in order, and as the model says.
    for s in range(B_STREAMS):
        got = port_records(daemon, "b", s)
        assert [r["seq"] for r in got] == writer.data_seqs[s]
        recording = expected[s % len(expected)]
        want = np.concatenate([recording] * (len(got) // len(recording) + 1))
        np.testing.assert_allclose(scores_of(got, labels), want[:len(got)], atol=1e-6)
    assert metrics.get('edgernn_reconnects_total{port="a"}') == cycles
    assert metric_sum(metrics, "edgernn_reconnects_total") == cycles
    assert 'edgernn_seq_gaps_total{port="b"}' not in metrics
    assert (fds_after, threads_after) == (fds_before, threads_before)
    figures = {"replugs": cycles,
               "reconnect_median_s": round(statistics.median(reconnect_s), 3),
               "reconnect_worst_s": round(max(reconnect_s), 3),
               "reconnect_after_long_outage_s": [round(reconnect_s[c], 3) for c in
                                                  range(9, cycles, 10)],
               "fds": (fds_before, fds_after),
               "threads": (threads_before, threads_after),
               "port_b_predictions": sum(len(v) for v in writer.data_seqs.values())}
    _log.warning("replug figures: %s", figures)
    assert max(reconnect_s) <= BACKOFF_MAX_S
    assert statistics.median(reconnect_s) <= 1.0
    return figures


def test_replug_reconnects_resets_and_leaks_nothing(
        basicmotions_model, recordings, expected, tmp_path):
    run_replugs(basicmotions_model, recordings, expected, tmp_path, cycles=50)


@pytest.mark.slow
def test_replug_many_times(basicmotions_model, recordings, expected, tmp_path):
    run_replugs(basicmotions_model, recordings, expected, tmp_path, cycles=300,
                capped_outage=True)


def test_port_missing_at_start_is_picked_up_when_it_appears(
        basicmotions_model, recordings, expected, tmp_path):
    labels = load_manifest(basicmotions_model).labels
    link = tmp_path / "by-id-late"
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        basicmotions_model, {"a": str(link)}))
    daemon = Daemon(["--config", str(config), "--log-level", "debug"], tmp_path)
    port = None
    try:
        daemon.wait_ready()
        assert daemon.wait_stderr("ready: 1 ports, 0 open")
        assert daemon.count_stderr(f"port a ({link}) cannot be opened") == 1
        port = PtyPort(link, raw=True)
        appeared_s = probe_until_prediction(daemon, port, [0], BACKOFF_MAX_S + 5.0)
        done = len(daemon.records)
        port.write(b"".join(encode_frame(0, t, f) for t, f in enumerate(recordings[0])))
        records = daemon.wait_records(done + len(recordings[0]))[done:]
    finally:
        code = daemon.stop()
        if port is not None:
            port.close()
    assert code == 0
    _log.warning("port appeared after start: prediction %.3f s after it appeared",
                 appeared_s)
    assert appeared_s <= BACKOFF_MAX_S
    np.testing.assert_allclose(scores_of(records, labels), expected[0], atol=1e-6)
    # Still the first connection: nothing was reset for it.
    assert daemon.count_stderr("reset: reconnect") == 0


class HangUpServer(threading.Thread):
    """A TCP port that accepts and hangs up at once, like ser2net whose serial
    device is gone; counts the connections."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[float] = []
        self.cond = threading.Condition()

    def run(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            connection.close()
            with self.cond:
                self.accepted.append(time.monotonic())
                self.cond.notify_all()

    def wait_accepted(self, count: int, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.accepted) >= count, timeout_s)


def test_port_that_hangs_up_at_once_is_reopened_with_backoff(
        basicmotions_model, tmp_path):
    server = HangUpServer()
    server.start()
    url = f"socket://127.0.0.1:{server.port}"
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        basicmotions_model, {"a": url}))
    daemon = Daemon(["--config", str(config)], tmp_path)
    try:
        daemon.wait_ready()
        assert server.wait_accepted(6, 20.0)
    finally:
        code = daemon.stop()
        server.listener.close()
    assert code == 0
    # Waits of 0.1, 0.2, 0.4, 0.8 and 1.6 s between the six connections; without
    # backoff they come every few hundred milliseconds.
    assert server.accepted[5] - server.accepted[0] >= 3.1
    assert daemon.count_stderr("lost right after opening") == 1
    assert daemon.count_stderr("port a open") == 1
    assert daemon.count_stderr(" WARNING ") == 1
