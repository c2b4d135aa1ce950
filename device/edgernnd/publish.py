"""The bounded hand-over between inference and a sink.

Inference must never wait for the network or a full disk, so it only appends to a
bounded queue; a worker thread moves the queue into the sink. When the queue is
full the oldest prediction goes: a live reading is worth more than a stale one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from edgernnd.errors import ConfigError
from edgernnd.frames import Prediction
from edgernnd.sinks import Sink

_log = logging.getLogger(__name__)

DROPPED_METRIC = "edgernn_predictions_dropped_total"

# A sink that keeps failing or a queue that keeps overflowing would otherwise log
# once per prediction, i.e. tens of lines a second.
LOG_INTERVAL_S = 10.0

# Predictions taken from the queue at once. A line sink writes them with one
# system call; 256 lines of ~250 bytes stay well within a pipe's 64 KiB.
BATCH_SIZE = 256


class DropCounter:
    """Counts the predictions one sink has lost, in a counter and in the log.

    The first drop is logged at WARNING at once, later ones at most every
    ``interval_s`` seconds with the number since the last line.

    Not thread-safe: the owner calls :meth:`add` under its own lock.

    Attributes:
        count: Predictions dropped so far.
    """

    def __init__(
        self,
        sink_name: str,
        metrics: Any = None,
        logger: logging.Logger = _log,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.count = 0
        self._sink_name = sink_name
        self._metrics = metrics
        self._logger = logger
        self._interval_s = interval_s
        self._logged_count = 0
        self._logged_at: float | None = None

    def add(self, n: int, reason: str) -> None:
        """Counts ``n`` dropped predictions; ``reason`` completes the log line."""
        if n <= 0:
            return
        self.count += n
        if self._metrics is not None:
            self._metrics.inc(DROPPED_METRIC, n, sink=self._sink_name)

        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self._interval_s:
            self._logger.warning(
                "sink %s: dropped %d predictions (%s); %d dropped in total",
                self._sink_name, self.count - self._logged_count, reason, self.count,
            )
            self._logged_count = self.count
            self._logged_at = now


class Publisher:
    """Moves predictions from inference into a sink through a bounded queue.

    :meth:`submit` never blocks: it appends to a deque and, when the deque holds
    ``queue_size`` predictions, drops the oldest and counts it. One worker thread
    (a daemon thread, started here) hands the predictions to ``sink.publish`` in
    order. A sink that raises loses that prediction: it is counted in
    :attr:`failed` and logged, and the worker goes on with the next.

    Args:
        sink: Where predictions go; see :class:`edgernnd.sinks.Sink`.
        queue_size: The bound of the queue, >= 1.
        metrics: An object with ``inc(name, n=1, **labels)`` (e.g.
            :class:`edgernnd.metrics.Metrics`), or None. Drops are counted in
            ``edgernn_predictions_dropped_total{sink=<sink.name>}``.

    Raises:
        ConfigError: ``queue_size`` is below 1.

    Attributes:
        dropped: Predictions dropped because the queue was full, or submitted
            after :meth:`close`, or still queued when :meth:`close` gave up.
        published: Predictions the sink accepted.
        failed: Predictions the sink raised on.
    """

    def __init__(self, sink: Sink, queue_size: int, metrics: Any = None) -> None:
        if queue_size < 1:
            raise ConfigError(f"publish.queue_size must be >= 1, got {queue_size!r}")
        self._sink = sink
        self._queue_size = queue_size
        self._queue: collections.deque[Prediction] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._drops = DropCounter(sink.name, metrics)
        self.published = 0
        self.failed = 0
        self._failures_logged_at: float | None = None
        self._batched = hasattr(sink, "write_lines")
        self._in_hand = 0  # predictions taken from the queue, not yet published
        self._worker = threading.Thread(
            target=self._run, name=f"publish-{sink.name}", daemon=True
        )
        self._worker.start()

    @property
    def dropped(self) -> int:
        return self._drops.count

    @property
    def queued(self) -> int:
        """Predictions waiting in the queue (not counting one being published)."""
        with self._cond:
            return len(self._queue)

    def submit(self, prediction: Prediction) -> None:
        """Queues a prediction for the sink; returns at once."""
        self.submit_many((prediction,))

    def submit_many(self, predictions: Sequence[Prediction]) -> None:
        """Queues several predictions, in order, with one hand-over to the worker.

        The daemon submits all predictions of one chunk read from a port together:
        taking the lock and waking the worker once per chunk instead of once per
        frame is what keeps the hand-over cheap at high frame rates.
        """
        if not predictions:
            return
        with self._cond:
            if self._closing:
                self._drops.add(len(predictions), "submitted after close")
                return
            queue = self._queue
            queue.extend(predictions)
            excess = len(queue) - self._queue_size
            if excess > 0:
                for _ in range(excess):
                    queue.popleft()
                self._drops.add(excess, f"queue of {self._queue_size} full")
            self._cond.notify()

    def close(self, timeout_s: float = 5.0) -> bool:
        """Publishes what is queued within ``timeout_s``, then closes the sink.

        Predictions still queued at the deadline are dropped and counted. When the
        sink is stuck inside ``publish`` at the deadline it is not closed (closing
        it could block as well); a WARNING says so.

        Returns:
            True if every queued prediction reached the sink and the sink was
            closed.
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join(timeout_s)

        if self._worker.is_alive():
            with self._cond:
                # A line sink stuck in its write holds a batch besides the queue;
                # those predictions never arrive either (for other sinks the one
                # in hand is not counted: it may still get through).
                in_hand = self._in_hand if self._batched else 0
                left = len(self._queue) + in_hand
                self._queue.clear()
                self._drops.add(left, "still queued at shutdown")
            _log.warning(
                "sink %s still busy after %.1f s; %d queued predictions dropped and "
                "the sink left open", self._sink.name, timeout_s, left,
            )
            return False

        self._sink.close()
        _log.info(
            "sink %s closed: %d published, %d dropped, %d failed",
            self._sink.name, self.published, self.dropped, self.failed,
        )
        return True

    def _run(self) -> None:
        # Line sinks (stdout, file) take a whole batch in one write and one flush.
        # Other sinks take one prediction at a time, so that what is still queued
        # when a stuck sink is given up on is known exactly.
        encode = getattr(self._sink, "encode", None)
        write_lines = getattr(self._sink, "write_lines", None)
        batch_size = 1 if write_lines is None else BATCH_SIZE
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                queue = self._queue
                batch = [queue.popleft() for _ in range(min(len(queue), batch_size))]
                self._in_hand = len(batch)

            if write_lines is None:
                self._publish_one(batch[0])
                continue
            lines = []
            for prediction in batch:
                try:
                    lines.append(encode(prediction))
                except Exception as e:  # noqa: BLE001 - a bad record costs one record
                    self._note_failure(e)
            try:
                write_lines(lines)
            except Exception as e:  # noqa: BLE001 - a failed write costs the batch
                self.failed += len(lines) - 1
                self._note_failure(e)
            else:
                self.published += len(lines)
            self._in_hand = 0

    def _publish_one(self, prediction: Prediction) -> None:
        try:
            self._sink.publish(prediction)
        except Exception as e:  # noqa: BLE001 - any sink failure costs one record
            self._note_failure(e)
        else:
            self.published += 1

    def _note_failure(self, error: Exception) -> None:
        self.failed += 1
        now = time.monotonic()
        if (
            self._failures_logged_at is None
            or now - self._failures_logged_at >= LOG_INTERVAL_S
        ):
            self._failures_logged_at = now
            _log.warning(
                "sink %s failed to publish a prediction (%d failed so far): %s",
                self._sink.name, self.failed, error, exc_info=error,
            )
