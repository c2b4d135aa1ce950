"""Slow consumers and sustained load: a stalled sink must not stall reading or
inference, memory must stay flat, and every lost prediction must be counted.
"""

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from daemon_harness import (
    Daemon,
    PtyPort,
    daemon_config,
    metric_sum,
    wait_metrics,
    write_config,
)
from mosquitto_broker import find_mosquitto

from edgernnd.binary_codec import encode_frame
from edgernnd.mqtt_sink import MAX_INFLIGHT
from edgernnd.publish import BATCH_SIZE

_log = logging.getLogger(__name__)

FRAMES = "edgernn_frames_total"
PREDICTIONS = "edgernn_predictions_total"
DROPPED = "edgernn_predictions_dropped_total"
FRAMES_DROPPED = "edgernn_frames_dropped_total"
WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s
# Growth of VmRSS allowed while the sink is stalled and the queue stays full.
STALL_RSS_GROWTH_KB = 2048


class RateWriter(threading.Thread):
    """Writes ``per_tick`` frames of each of ``streams`` streams every ``tick_s``
    until stopped; seq numbers run on per stream (mod 65536)."""

    def __init__(self, port: PtyPort, values: np.ndarray, streams: int,
                 per_tick: int, tick_s: float = 0.01):
        super().__init__(daemon=True)
        self.port, self.values = port, values
        self.streams, self.per_tick, self.tick_s = streams, per_tick, tick_s
        self.stopping = threading.Event()
        self.written = 0
        self.started_at = self.stopped_at = 0.0

    def run(self):
        self.started_at = start = time.monotonic()
        tick, n = 0, len(self.values)
        while not self.stopping.wait(max(0.0, start + tick * self.tick_s
                                         - time.monotonic())):
            first = tick * self.per_tick
            chunk = b"".join(
                encode_frame(s, (first + k) % 65536, self.values[(first + k) % n])
                for k in range(self.per_tick) for s in range(self.streams))
            self.port.write(chunk)
            self.written += self.per_tick * self.streams
            tick += 1
        self.stopped_at = time.monotonic()

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return self.written


@pytest.fixture
def values(basicmotions_test):
    return np.concatenate([np.asarray(s, np.float32)
                           for s in basicmotions_test.sequences[:10]])


def count_messages(daemon, key: str) -> int:
    return sum(line.split("=", 1)[0] == key for m in list(daemon.messages)
               for line in m.split("\n"))


def check_keeps_going(daemon, textfile, writer) -> dict:
    """With the sink stalled and its queue overflowing, reading, inference and
    the watchdog carry on at the writer's pace and memory stays put."""
    stalled = wait_metrics(textfile, lambda m: metric_sum(m, DROPPED) > 0)
    rss_before = daemon.rss_kb()
    watchdog_before = count_messages(daemon, "WATCHDOG")
    status_before = count_messages(daemon, "STATUS")
    started = time.monotonic()
    frames_before = metric_sum(stalled, FRAMES)
    # Two seconds' worth of frames at the writer's rate.
    target = frames_before + 2.0 * writer.streams * writer.per_tick / writer.tick_s
    later = wait_metrics(textfile, lambda m: metric_sum(m, FRAMES) >= target)
    elapsed_s = time.monotonic() - started
    figures = {
        "frames_per_s": round((metric_sum(later, FRAMES) - frames_before) / elapsed_s),
        "watchdog_pings": count_messages(daemon, "WATCHDOG") - watchdog_before,
        "status_lines": count_messages(daemon, "STATUS") - status_before,
        "dropped": (metric_sum(stalled, DROPPED), metric_sum(later, DROPPED)),
        "rss_kb": (rss_before, daemon.rss_kb()),
        "seconds": round(elapsed_s, 2),
    }
    # 2 s at one ping per 0.2 s is ten pings; and STATUS= every interval_s.
    assert figures["watchdog_pings"] >= int(elapsed_s / 0.2) - 2, figures
    assert figures["status_lines"] >= int(elapsed_s / 0.2) - 2, figures
    assert figures["dropped"][1] > figures["dropped"][0], figures
    assert figures["rss_kb"][1] - figures["rss_kb"][0] <= STALL_RSS_GROWTH_KB, figures
    # The writer itself is paced at 2000 frames/s; inference keeps up with it.
    assert elapsed_s <= 4.0, figures
    return figures


def test_stalled_file_sink_does_not_stall_reading_or_inference(
        basicmotions_model, values, tmp_path):
    fifo = tmp_path / "predictions.fifo"
    os.mkfifo(fifo)
    # A reader that never reads: the daemon's open succeeds, its writes block
    # once the pipe's 64 KiB are full.
    stuck_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    textfile = tmp_path / "edgernnd.prom"
    port = PtyPort()
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        basicmotions_model, {"imu": port.path},
        publish={"sink": "file", "file": fifo, "queue_size": 1000},
        metrics={"textfile": textfile, "interval_s": 0.2}))
    daemon = Daemon(["--config", str(config)], tmp_path,
                    env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    writer = RateWriter(port, values, streams=4, per_tick=5)
    try:
        daemon.wait_ready()
        writer.start()
        figures = check_keeps_going(daemon, textfile, writer)
        written = writer.stop()
        wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS) == written)
        stop_started = time.monotonic()
        code = daemon.stop(signal.SIGTERM)
        stop_s = time.monotonic() - stop_started
        in_fifo = b""
        while chunk := os.read(stuck_reader, 1 << 16):
            in_fifo += chunk
    finally:
        writer.stop()
        daemon.stop()
        os.close(stuck_reader)
        port.close()

    final = wait_metrics(textfile, lambda m: True)
    figures.update(predictions=written, in_fifo=in_fifo.count(b"\n"),
                   dropped_total=metric_sum(final, DROPPED), stop_s=round(stop_s, 1))
    _log.warning("stalled file sink: %s", figures)
    assert code == 0, daemon.stderr_text()
    complete = in_fifo[:in_fifo.rfind(b"\n") + 1].splitlines()
    assert [json.loads(line)["port"] for line in complete] == ["imu"] * len(complete)
    # Every prediction reached the FIFO or was counted as dropped. The batch the
    # worker was blocked writing when the daemon gave up on it is counted as
    # dropped whole, though the pipe may have taken its first lines: those are
    # counted twice (fewer than BATCH_SIZE).
    twice = figures["in_fifo"] + metric_sum(final, DROPPED) - written
    assert 0 <= twice < BATCH_SIZE, figures
    assert metric_sum(final, PREDICTIONS) == written
    assert daemon.count_stderr("sink file still busy after 5.0 s") == 1
    assert stop_s < 10.0


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_stopped_broker_does_not_stall_reading_or_inference(
        basicmotions_model, values, tmp_path, mosquitto):
    model = basicmotions_model
    textfile = tmp_path / "edgernnd.prom"
    port = PtyPort()
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        model, {"imu": port.path},
        publish={"sink": "mqtt", "queue_size": 1000},
        mqtt={"port": mosquitto.port, "client_id": "edge-load", "qos": 1},
        metrics={"textfile": textfile, "interval_s": 0.2}))
    daemon = Daemon(["--config", str(config)], tmp_path,
                    env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    writer = RateWriter(port, values, streams=4, per_tick=5)
    kept = 1000 + MAX_INFLIGHT
    # The broker's process is frozen: its socket stays open and accepts nothing.
    broker_pid = mosquitto._process.pid
    try:
        daemon.wait_ready()
        assert daemon.wait_stderr("connected to MQTT broker")
        os.kill(broker_pid, signal.SIGSTOP)
        writer.start()
        figures = check_keeps_going(daemon, textfile, writer)
        written = writer.stop()
        final = wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS) == written
                             and metric_sum(m, DROPPED) >= written - kept)
    finally:
        os.kill(broker_pid, signal.SIGCONT)
        writer.stop()
        code = daemon.stop()
        port.close()
    _log.warning("stopped broker: %s, %d predictions, %d dropped", figures, written,
                 metric_sum(final, DROPPED))
    assert code == 0, daemon.stderr_text()
    # Kept: the newest queue_size in the sink and the oldest MAX_INFLIGHT handed
    # to paho, unacknowledged, less the inflight slots taken by "online" and the
    # discovery messages. Everything else was dropped and counted.
    control = 1 + 2 * 4
    assert written - kept <= metric_sum(final, DROPPED) <= written - kept + control


def run_soak(model, tmp_path, values, duration_s: float, rss_growth_kb: int) -> dict:
    streams, rate_hz = 8, 1000  # per stream
    textfile = tmp_path / "edgernnd.prom"
    port = PtyPort()
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        model, {"imu": port.path},
        publish={"sink": "file", "file": "/dev/null"},
        metrics={"textfile": textfile, "interval_s": 1.0}))
    daemon = Daemon(["--config", str(config)], tmp_path,
                    env={"WATCHDOG_USEC": "2000000"})
    writer = RateWriter(port, values, streams=streams, per_tick=rate_hz // 100)
    samples = []
    try:
        daemon.wait_ready()
        writer.start()
        end = time.monotonic() + duration_s
        # Warm-up: the first seconds fill the invoke window and the allocator.
        first = wait_metrics(textfile, lambda m: metric_sum(m, FRAMES) >= 3 * streams
                             * rate_hz, timeout_s=30)
        rss_start, counts_start = daemon.rss_kb(), daemon.proc_counts()
        while time.monotonic() < end:
            # One sample a second; the writer thread keeps the load on meanwhile.
            writer.stopping.wait(1.0)
            samples.append(daemon.rss_kb())
        rss_end, counts_end = daemon.rss_kb(), daemon.proc_counts()
        written = writer.stop()
        final = wait_metrics(textfile, lambda m: metric_sum(m, FRAMES)
                             + metric_sum(m, FRAMES_DROPPED) == written, timeout_s=60)
        watchdog = count_messages(daemon, "WATCHDOG")
    finally:
        writer.stop()
        code = daemon.stop()
        port.close()
    assert code == 0, daemon.stderr_text()
    seconds = writer.stopped_at - writer.started_at
    figures = {"seconds": round(seconds, 1), "frames": written,
               "frames_per_s": round(written / seconds),
               "frames_dropped": metric_sum(final, FRAMES_DROPPED),
               "rss_kb_start_end": (rss_start, rss_end),
               "rss_kb_max": max(samples), "rss_kb_every_60_s": samples[::60],
               "fds_threads": (counts_start, counts_end),
               "frames_at_warmup": metric_sum(first, FRAMES)}
    _log.warning("soak: %s", figures)
    assert figures["frames_per_s"] >= 0.5 * streams * rate_hz, figures
    assert metric_sum(final, PREDICTIONS) == metric_sum(final, FRAMES)
    assert max(samples) - rss_start <= rss_growth_kb, figures
    assert counts_start == counts_end
    # A ping every second (half of WATCHDOG_USEC); each is due a second after
    # the last one was sent, so the loop's latency delays the later ones a bit.
    assert watchdog >= 0.9 * seconds / 1.0, figures
    return figures


def test_soak_short_keeps_memory_flat(basicmotions_model, values, tmp_path):
    run_soak(basicmotions_model, tmp_path, values, duration_s=20.0, rss_growth_kb=4096)


@pytest.mark.slow
def test_soak_ten_minutes_keeps_memory_flat(basicmotions_model, values, tmp_path):
    run_soak(basicmotions_model, tmp_path, values, duration_s=600.0, rss_growth_kb=8192)
