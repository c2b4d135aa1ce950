"""MQTT broker faults through a running edgernnd: the broker restarts while
predictions flow, the daemon is killed (last will), discovery is retained.

The subscriber holds a persistent session at a broker with persistence, so the
broker keeps, across its restart, whatever it acknowledged for the subscriber:
every prediction missing at the subscriber was lost by the daemon.
"""

import json
import logging
import re
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
from mosquitto_broker import MosquittoBroker, Subscriber, find_mosquitto

from edgernnd.binary_codec import encode_frame

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="mosquitto is not installed")

_log = logging.getLogger(__name__)

CLIENT_ID = "edge-faults"
PREDICTION_TOPICS = [f"edgernn/{CLIENT_ID}/+/+/prediction"]
AVAILABILITY = f"edgernn/{CLIENT_ID}/availability"
STREAMS = 4
PERIOD_S = 0.02  # a frame per stream every 20 ms: 200 predictions/s
WAIT_S = 20.0
PREDICTIONS = "edgernn_predictions_total"
DROPPED = "edgernn_predictions_dropped_total"


class Frames:
    """Numbered frames of every stream; ``written`` is the global order."""

    def __init__(self, port: PtyPort, recordings):
        self.port, self.recordings = port, recordings
        self.seq = dict.fromkeys(range(STREAMS), 0)
        self.written: list[tuple[int, int]] = []  # (stream, seq) in write order
        self._lock = threading.Lock()

    def write_round(self) -> None:
        """One frame of every stream."""
        with self._lock:
            chunk = []
            for s in range(STREAMS):
                recording = self.recordings[s % len(self.recordings)]
                seq = self.seq[s]
                chunk.append(encode_frame(s, seq, recording[seq % len(recording)]))
                self.written.append((s, seq))
                self.seq[s] = seq + 1
            self.port.write(b"".join(chunk))


def write_paced(frames: Frames, rounds: int | None,
                stopping: threading.Event | None = None) -> None:
    """Writes a round every PERIOD_S, ``rounds`` times or until ``stopping``."""
    stopping = stopping or threading.Event()
    start, t = time.monotonic(), 0
    while rounds is None or t < rounds:
        if stopping.wait(max(0.0, start + t * PERIOD_S - time.monotonic())):
            return
        frames.write_round()
        t += 1


class PacedWriter(threading.Thread):
    """:func:`write_paced` on a thread, until stopped."""

    def __init__(self, frames: Frames):
        super().__init__(daemon=True)
        self.frames = frames
        self.stopping = threading.Event()

    def run(self):
        write_paced(self.frames, None, self.stopping)

    def stop(self):
        self.stopping.set()
        self.join()


class Received:
    """Distinct (stream, seq) pairs among the subscriber's messages, parsed once."""

    def __init__(self):
        self.pairs: set[tuple[int, int]] = set()
        self.messages = 0
        self._parsed = 0

    def __call__(self, messages) -> set:
        for m in messages[self._parsed:]:
            if m.topic.endswith("/prediction"):
                record = json.loads(m.payload)
                self.pairs.add((record["stream"], record["seq"]))
                self.messages += 1
        self._parsed = len(messages)
        return self.pairs


def start_daemon(tmp_path, model, port, broker_port: int, queue_size: int):
    textfile = tmp_path / "edgernnd.prom"
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        model, {"imu": port.path},
        publish={"sink": "mqtt", "queue_size": queue_size},
        mqtt={"host": "127.0.0.1", "port": broker_port, "client_id": CLIENT_ID,
              "qos": 1, "keepalive_s": 5},
        metrics={"textfile": textfile, "interval_s": 0.2}))
    daemon = Daemon(["--config", str(config)], tmp_path)
    daemon.wait_ready()
    return daemon, textfile


def outage_figures(daemon) -> tuple[float, int]:
    """(outage s, predictions waiting) from the daemon's reconnection line."""
    line = next(x for x in daemon.stderr_lines if "reconnected to MQTT broker" in x)
    match = re.search(r"after ([0-9.]+) s; ([0-9]+) predictions to send", line)
    return float(match.group(1)), int(match.group(2))


@pytest.fixture
def recordings(basicmotions_test):
    return [np.asarray(s, np.float32) for s in basicmotions_test.sequences[:STREAMS]]


def test_broker_restart_loses_no_prediction_within_queue_bound(
        basicmotions_model, recordings, tmp_path):
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    port = PtyPort()
    daemon = sub = writer = None
    received = Received()
    try:
        broker.start()
        sub = Subscriber(broker, PREDICTION_TOPICS, client_id="faults-sub",
                         clean_session=False)
        sub.start()
        daemon, textfile = start_daemon(tmp_path, basicmotions_model, port,
                                        broker.port, queue_size=10000)
        frames = Frames(port, recordings)
        writer = PacedWriter(frames)
        writer.start()
        assert sub.wait_for(lambda ms: len(received(ms)) >= 100, WAIT_S)

        broker.stop()
        assert daemon.wait_stderr("lost the connection to MQTT broker")
        down = metric_sum(wait_metrics(textfile, lambda m: True), PREDICTIONS)
        # About 2 s of predictions while the broker is away.
        wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS) >= down + 400)
        broker.start()
        assert daemon.wait_stderr("reconnected to MQTT broker")
        up = metric_sum(wait_metrics(textfile, lambda m: True), PREDICTIONS)
        wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS) >= up + 200)
        writer.stop()

        written = set(frames.written)
        metrics = wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS)
                               == len(written))
        complete = sub.wait_for(lambda ms: received(ms) >= written, WAIT_S)
    finally:
        if writer is not None:
            writer.stop()
        code = daemon.stop() if daemon is not None else None
        if sub is not None:
            sub.close()
        broker.close()
        port.close()

    lost = len(written - received.pairs)
    outage_s, waiting = outage_figures(daemon)
    _log.warning("broker restart: %d predictions, %d lost, %d duplicates, outage "
                 "%.1f s, %d waiting at reconnect", len(written), lost,
                 received.messages - len(received.pairs), outage_s, waiting)
    assert complete and lost == 0
    for s in range(STREAMS):
        assert sorted(q for t, q in received.pairs if t == s) == list(
            range(frames.seq[s]))
    assert metric_sum(metrics, DROPPED) == 0
    assert outage_s >= 0.5 and waiting >= 100
    assert code == 0, daemon.stderr_text()


def test_broker_restart_with_tiny_queue_drops_exactly_the_oldest(
        basicmotions_model, recordings, tmp_path):
    queue_size, burst_rounds = 50, 50
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    port = PtyPort()
    daemon = sub = None
    received = Received()
    try:
        broker.start()
        sub = Subscriber(broker, PREDICTION_TOPICS, client_id="tiny-sub",
                         clean_session=False)
        sub.start()
        daemon, textfile = start_daemon(tmp_path, basicmotions_model, port,
                                        broker.port, queue_size=queue_size)
        frames = Frames(port, recordings)
        write_paced(frames, 50)
        phase1 = list(frames.written)
        assert sub.wait_for(lambda ms: received(ms) >= set(phase1), WAIT_S)

        broker.stop()
        assert daemon.wait_stderr("lost the connection to MQTT broker")
        for _ in range(burst_rounds):  # all at once, while the broker is away
            frames.write_round()
        phase2 = frames.written[len(phase1):]
        made = len(phase1) + len(phase2)
        expect_dropped = len(phase2) - queue_size
        down = wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS) == made
                            and metric_sum(m, DROPPED) >= expect_dropped)

        broker.start()
        assert daemon.wait_stderr("reconnected to MQTT broker")
        write_paced(frames, 50)
        phase3 = frames.written[made:]
        kept = set(phase1) | set(phase2[-queue_size:]) | set(phase3)
        assert sub.wait_for(lambda ms: received(ms) >= kept, WAIT_S)
        metrics = wait_metrics(textfile, lambda m: metric_sum(m, PREDICTIONS)
                               == len(frames.written))
    finally:
        code = daemon.stop() if daemon is not None else None
        if sub is not None:
            sub.close()
        broker.close()
        port.close()

    _log.warning("tiny queue (%d): %d predictions, %d dropped (counted %d)",
                 queue_size, len(frames.written), len(phase2) - queue_size,
                 metric_sum(metrics, DROPPED))
    assert metric_sum(down, DROPPED) == expect_dropped == 150
    assert metric_sum(metrics, DROPPED) == expect_dropped
    assert received.pairs == kept
    assert code == 0, daemon.stderr_text()


def test_availability_last_will_and_discovery(
        basicmotions_model, recordings, tmp_path, mosquitto):
    port = PtyPort()
    availability = Subscriber(mosquitto, [AVAILABILITY])
    availability.start()
    first = second = None

    def payloads(ms):
        return [m.payload for m in ms]

    try:
        first, _ = start_daemon(tmp_path, basicmotions_model, port, mosquitto.port,
                                queue_size=1000)
        assert availability.wait_for(lambda ms: payloads(ms) == [b"online"], WAIT_S)
        frames = Frames(port, recordings)
        for _ in range(5):
            frames.write_round()
        first.stop(signal.SIGKILL)
        assert availability.wait_for(
            lambda ms: payloads(ms) == [b"online", b"offline"], WAIT_S)

        second, _ = start_daemon(tmp_path, basicmotions_model, port, mosquitto.port,
                                 queue_size=1000)
        assert availability.wait_for(
            lambda ms: payloads(ms) == [b"online", b"offline", b"online"], WAIT_S)
        frames.write_round()
        with Subscriber(mosquitto, [AVAILABILITY]) as late:
            assert late.wait_for(lambda ms: len(ms) == 1, WAIT_S)
            retained = late.snapshot()[0]
        with Subscriber(mosquitto, ["homeassistant/sensor/+/config"]) as discovery:
            assert discovery.wait_for(lambda ms: len(ms) >= 2 * STREAMS, WAIT_S)
            configs = {m.topic: (json.loads(m.payload), m.retain)
                       for m in discovery.snapshot()}
        assert second.stop(signal.SIGTERM) == 0
        assert availability.wait_for(
            lambda ms: payloads(ms) == [b"online", b"offline", b"online", b"offline"],
            WAIT_S)
    finally:
        for daemon in (first, second):
            if daemon is not None:
                daemon.stop()
        availability.close()
        port.close()

    assert (retained.payload, retained.retain) == (b"online", True)
    want = {f"homeassistant/sensor/{CLIENT_ID}_imu_{s}_{what}/config"
            for s in range(STREAMS) for what in ("label", "confidence")}
    assert set(configs) == want
    for topic, (config, retain) in configs.items():
        stream = int(topic.split("_")[-2])
        assert retain
        assert config["state_topic"] == f"edgernn/{CLIENT_ID}/imu/{stream}/prediction"
        assert config["availability_topic"] == AVAILABILITY
