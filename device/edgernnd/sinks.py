"""Where predictions go: JSON lines on stdout or in a file (MQTT: mqtt_sink.py).

Every sink writes the record of :meth:`Prediction.to_json_dict` as compact JSON,
one record per line, and makes each record visible (flushed) before returning:
a reader tailing the output sees a prediction as soon as it is made.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from edgernnd.config import Config, SinkKind
from edgernnd.errors import ConfigError
from edgernnd.frames import Prediction

_log = logging.getLogger(__name__)

FILE_MODE = 0o640

# os.stat of the path costs a system call; once a second is soon enough to follow
# logrotate and cheap at hundreds of predictions a second.
REOPEN_CHECK_S = 1.0


class Sink(Protocol):
    """What :class:`edgernnd.publish.Publisher` drives.

    Attributes:
        name: Short name for logs and the ``sink`` label of metrics.
    """

    name: str

    def publish(self, prediction: Prediction) -> None:
        """Writes one prediction; may raise OSError (the caller counts it)."""

    def close(self) -> None:
        """Flushes and releases the sink; called once, after the last publish."""


def encode_prediction(prediction: Prediction, labels: tuple[str, ...]) -> bytes:
    """The published JSON record of a prediction, compact, without a newline.

    The same bytes as ``json.dumps(prediction.to_json_dict(labels),
    separators=(",", ":"))``, written out directly: this runs once per frame,
    and building the dict and walking it in ``json`` took several times longer.

    Raises:
        ValueError: A score or time is NaN or infinite (not valid JSON).
    """
    p = prediction
    if not (math.isfinite(p.host_time) and math.isfinite(p.latency_ms)):
        raise ValueError(f"prediction time is not finite: {p.host_time!r}, "
                         f"{p.latency_ms!r}")
    keys = _label_keys(labels)
    sensor = "null" if p.sensor_time_ms is None else int(p.sensor_time_ms)
    pairs = ",".join([f"{k}:{_score_text(v)}" for k, v in zip(keys, p.scores)])
    return (
        f'{{"port":{_json_string(p.port)},"stream":{int(p.stream_id)},'
        f'"seq":{int(p.seq)},"sensor_time_ms":{sensor},'
        f'"host_time":{round(p.host_time, 6)!r},"label":{_json_string(p.label)},'
        f'"confidence":{_score_text(max(p.scores))},"scores":{{{pairs}}},'
        f'"latency_ms":{round(p.latency_ms, 3)!r}}}'
    ).encode()


@functools.lru_cache(maxsize=4096)
def _score_text(value: float) -> str:
    """A score as JSON, rounded to 6 decimals. Scores of an int8 model take at
    most 256 values per model, so nearly every call is a cache hit."""
    if not math.isfinite(value):
        raise ValueError(f"prediction score is not finite: {value!r}")
    return repr(round(value, 6))


@functools.lru_cache(maxsize=4096)
def _json_string(text: str) -> str:
    return json.dumps(text)


@functools.lru_cache(maxsize=64)
def _label_keys(labels: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(json.dumps(label) for label in labels)


class StdoutSink:
    """JSON lines on a binary stream, flushed after each line.

    Args:
        labels: Class labels in manifest order, for the record's scores.
        stream: A binary stream; default ``sys.stdout.buffer``. It is flushed but
            never closed.
    """

    name = "stdout"

    def __init__(
        self, labels: tuple[str, ...], stream: BinaryIO | None = None
    ) -> None:
        self._labels = tuple(labels)
        self._stream = stream if stream is not None else sys.stdout.buffer

    def encode(self, prediction: Prediction) -> bytes:
        """One JSON line, newline included."""
        return encode_prediction(prediction, self._labels) + b"\n"

    def write_lines(self, lines: list[bytes]) -> None:
        """Writes encoded lines with one write and one flush."""
        self._stream.write(b"".join(lines))
        self._stream.flush()

    def publish(self, prediction: Prediction) -> None:
        self.write_lines([self.encode(prediction)])

    def close(self) -> None:
        self._stream.flush()


class FileSink:
    """JSON lines appended to a file, each record written with one ``write``.

    The file is opened with O_APPEND and created with mode 0o640 (less what the
    process umask removes). When the path no longer names the open file (logrotate
    moved it away, or it was deleted), the next record goes to a new file at the
    path; this is checked at most every ``reopen_check_s`` seconds, so records of
    the last second may still land in the rotated file. If the new file cannot be
    opened, records keep going to the old one and a WARNING says why.

    Not thread-safe: one writer (the publisher's worker) at a time.

    Args:
        path: The JSON-lines file.
        labels: Class labels in manifest order, for the record's scores.
        reopen_check_s: Least interval between checks of the path, in seconds.

    Raises:
        ConfigError: The file cannot be opened for appending.
    """

    name = "file"

    def __init__(
        self,
        path: str | os.PathLike,
        labels: tuple[str, ...],
        reopen_check_s: float = REOPEN_CHECK_S,
    ) -> None:
        self.path = Path(path)
        self._labels = tuple(labels)
        self._reopen_check_s = reopen_check_s
        try:
            self._fd = _open_append(self.path)
        except OSError as e:
            raise ConfigError(
                f"cannot open publish.file {str(self.path)!r} for appending: "
                f"{e.strerror}; check the directory exists and is writable"
            ) from e
        self._identity = _identity(os.fstat(self._fd))
        self._checked_at = time.monotonic()
        _log.info("appending predictions to %s", self.path)

    def encode(self, prediction: Prediction) -> bytes:
        """One JSON line, newline included."""
        return encode_prediction(prediction, self._labels) + b"\n"

    def write_lines(self, lines: list[bytes]) -> None:
        """Appends encoded lines with one write (following a rotated file)."""
        now = time.monotonic()
        if now - self._checked_at >= self._reopen_check_s:
            self._checked_at = now
            self._follow_rotation()
        _write_all(self._fd, b"".join(lines))

    def publish(self, prediction: Prediction) -> None:
        self.write_lines([self.encode(prediction)])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _follow_rotation(self) -> None:
        try:
            if _identity(os.stat(self.path)) == self._identity:
                return
        except FileNotFoundError:
            pass
        try:
            fd = _open_append(self.path)
        except OSError as e:
            _log.warning(
                "%s was rotated away but cannot be reopened (%s); still writing to "
                "the old file", self.path, e.strerror,
            )
            return
        os.close(self._fd)
        self._fd = fd
        self._identity = _identity(os.fstat(fd))
        _log.info("%s was rotated; writing to a new file", self.path)


def make_sink(config: Config, labels: tuple[str, ...], metrics: Any = None) -> Sink:
    """Builds the sink that ``config.publish.sink`` names.

    paho-mqtt is imported only for the mqtt sink.

    Args:
        config: The daemon's validated configuration.
        labels: Class labels in manifest order.
        metrics: Passed to the MQTT sink for its drop counter, or None.

    Raises:
        ConfigError: The file cannot be opened, or the mqtt sink is configured
            and paho-mqtt is not installed, or the MQTT password cannot be read.
    """
    kind = config.publish.sink
    if kind is SinkKind.STDOUT:
        return StdoutSink(labels)
    if kind is SinkKind.FILE:
        if config.publish.file is None:
            raise ConfigError("publish.file must be a path when publish.sink is 'file'")
        return FileSink(config.publish.file, labels)

    try:
        from edgernnd.mqtt_sink import MqttSink
    except ImportError as e:
        if not (e.name or "").startswith("paho"):
            raise
        raise ConfigError(
            "publish.sink is 'mqtt' but paho-mqtt is not installed; "
            "install it with: pip install 'paho-mqtt>=2.0'"
        ) from e
    return MqttSink(
        config.mqtt, labels, metrics=metrics, queue_size=config.publish.queue_size
    )


def _open_append(path: Path) -> int:
    return os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
    )


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _write_all(fd: int, data: bytes) -> None:
    # A regular file takes the whole record in one write; the loop covers a
    # signal or a full disk interrupting it part-way.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
