"""Tests of edgernnd.publish: the bounded queue between inference and a sink."""

import logging
import threading
import time

import pytest

from edgernnd.errors import ConfigError
from edgernnd.frames import Prediction
from edgernnd.publish import DROPPED_METRIC, DropCounter, Publisher

WAIT_S = 5.0


def make_prediction(seq: int, port: str = "imu0", stream_id: int = 0) -> Prediction:
    return Prediction(port, stream_id, seq, None, 1.7e9 + seq, "walk", (0.25, 0.75),
                      1.5)


class RecordingMetrics:
    def __init__(self):
        self.calls = []

    def inc(self, name, n=1, **labels):
        self.calls.append((name, n, labels))

    def total(self, name, **labels):
        return sum(n for m, n, lab in self.calls if m == name and lab == labels)


class ListSink:
    """Keeps what it is given; publish blocks while ``gate`` is clear."""

    name = "list"

    def __init__(self, blocked: bool = False):
        self.received = []
        self.closed = False
        self.gate = threading.Event()
        if not blocked:
            self.gate.set()
        self.entered = threading.Event()
        self._cond = threading.Condition()

    def publish(self, prediction):
        self.entered.set()
        self.gate.wait()
        with self._cond:
            self.received.append(prediction.seq)
            self._cond.notify_all()

    def close(self):
        self.closed = True

    def wait_count(self, n, timeout_s=WAIT_S):
        with self._cond:
            return self._cond.wait_for(lambda: len(self.received) >= n, timeout_s)


def test_publisher_delivers_in_order_and_close_drains():
    sink = ListSink()
    publisher = Publisher(sink, queue_size=1000)
    for seq in range(500):
        publisher.submit(make_prediction(seq))

    assert publisher.close(timeout_s=WAIT_S)

    assert sink.received == list(range(500))
    assert sink.closed
    assert publisher.published == 500
    assert publisher.dropped == 0


def test_publisher_stalled_sink_submit_stays_fast_and_drops_oldest():
    sink = ListSink(blocked=True)
    metrics = RecordingMetrics()
    publisher = Publisher(sink, queue_size=10, metrics=metrics)
    publisher.submit(make_prediction(0))
    assert sink.entered.wait(WAIT_S)  # the worker now holds seq 0, stuck

    slowest_s = 0.0
    for seq in range(1, 5001):
        start = time.perf_counter()
        publisher.submit(make_prediction(seq))
        slowest_s = max(slowest_s, time.perf_counter() - start)

    # 5000 submitted behind the stuck one, 10 fit: exactly the oldest 4990 went.
    assert slowest_s < 0.05
    assert publisher.dropped == 4990
    assert metrics.total(DROPPED_METRIC, sink="list") == 4990
    assert publisher.queued == 10

    sink.gate.set()
    assert publisher.close(timeout_s=WAIT_S)
    assert sink.received == [0, *range(4991, 5001)]


def test_publisher_close_gives_up_on_stuck_sink():
    sink = ListSink(blocked=True)
    publisher = Publisher(sink, queue_size=100)
    for seq in range(5):
        publisher.submit(make_prediction(seq))
    assert sink.entered.wait(WAIT_S)

    start = time.monotonic()
    closed = publisher.close(timeout_s=0.3)
    elapsed_s = time.monotonic() - start

    assert not closed
    assert 0.25 <= elapsed_s < 2.0
    assert publisher.dropped == 4  # seq 0 is inside publish, 1..4 were queued
    assert not sink.closed
    sink.gate.set()


def test_publisher_sink_error_counted_and_worker_continues(caplog):
    class FlakySink(ListSink):
        def publish(self, prediction):
            if prediction.seq % 2:
                raise OSError(28, "No space left on device")
            super().publish(prediction)

    sink = FlakySink()
    publisher = Publisher(sink, queue_size=100)
    with caplog.at_level(logging.WARNING, logger="edgernnd.publish"):
        for seq in range(10):
            publisher.submit(make_prediction(seq))
        assert publisher.close(timeout_s=WAIT_S)

    assert sink.received == [0, 2, 4, 6, 8]
    assert publisher.failed == 5
    assert publisher.published == 5
    # Five failures within a second give one log line, not five.
    failures = [r for r in caplog.records if "failed to publish" in r.getMessage()]
    assert len(failures) == 1


def test_publisher_submit_after_close_is_counted():
    sink = ListSink()
    publisher = Publisher(sink, queue_size=10)
    assert publisher.close(timeout_s=WAIT_S)

    publisher.submit(make_prediction(1))

    assert publisher.dropped == 1
    assert sink.received == []


def test_publisher_rejects_empty_queue():
    with pytest.raises(ConfigError, match="queue_size"):
        Publisher(ListSink(), queue_size=0)


def test_drop_counter_logs_first_drop_then_rate_limits(caplog):
    metrics = RecordingMetrics()
    counter = DropCounter("mqtt", metrics, interval_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="edgernnd.publish"):
        counter.add(3, "queue full")
        counter.add(2, "queue full")
        counter.add(0, "queue full")

    assert counter.count == 5
    assert metrics.calls == [
        (DROPPED_METRIC, 3, {"sink": "mqtt"}),
        (DROPPED_METRIC, 2, {"sink": "mqtt"}),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "sink mqtt: dropped 3 predictions (queue full); 3 dropped in total"
    ]
