"""Records that travel through the daemon: decoded frames and predictions."""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class FrameKind(enum.Enum):
    """What a decoded frame asks of the daemon."""

    DATA = "data"
    RESET = "reset"  # The sender starts a new recording: reset this stream's state.


class Frame(NamedTuple):
    """One decoded sensor frame.

    Attributes:
        stream_id: Sender-chosen stream number (0 when the wire format carries none).
        seq: Sequence number, 0..65535 wrapping, or None when the format has none (csv).
        values: Raw sensor values, float32, shape (channels,). Empty for RESET frames.
        kind: DATA or RESET.
        sensor_time_ms: The sender's timestamp in milliseconds (uint32 wrapping), or None.
    """

    stream_id: int
    seq: int | None
    values: np.ndarray
    kind: FrameKind = FrameKind.DATA
    sensor_time_ms: int | None = None


class Prediction(NamedTuple):
    """One published prediction.

    Attributes:
        port: Name of the serial port the frame came from.
        stream_id: Stream number within that port.
        seq: Sequence number of the frame (or the daemon's own frame count for csv).
        sensor_time_ms: The sender's timestamp, or None.
        host_time: Unix time in seconds when the frame was read from the port.
        label: Most probable class label.
        scores: Dequantized class scores, one per label, in manifest order.
        latency_ms: From the frame's bytes being read to the prediction being made.
    """

    port: str
    stream_id: int
    seq: int
    sensor_time_ms: int | None
    host_time: float
    label: str
    scores: tuple[float, ...]
    latency_ms: float

    def to_json_dict(self, labels: tuple[str, ...]) -> dict:
        """The record as published: JSON-ready, scores keyed by label."""
        return {
            "port": self.port,
            "stream": self.stream_id,
            "seq": self.seq,
            "sensor_time_ms": self.sensor_time_ms,
            "host_time": round(self.host_time, 6),
            "label": self.label,
            "confidence": round(max(self.scores), 6),
            "scores": {k: round(v, 6) for k, v in zip(labels, self.scores)},
            "latency_ms": round(self.latency_ms, 3),
        }
