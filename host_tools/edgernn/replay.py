"""Stream recordings to a serial port, as sensors would.

Several recordings play at once, interleaved frame by frame, each on its own
stream id; when a recording ends, a marker tells the receiver (a reset frame in
``binary``, a reset line such as ``#reset 2`` in ``csv``) and the next recording
starts on that stream id. Sequence numbers run on per stream across recordings
(the marker takes one too), so a receiver sees no gap.

Pacing: one frame per stream every 1 / (rate_hz * speed) seconds, on a schedule
computed from the start (no drift from sleep overshoot); ``speed`` 0 writes as
fast as the port takes.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgernnd.binary_codec import encode_frame, encode_reset
from edgernnd.csv_codec import encode_csv_line, encode_csv_reset
from edgernnd.errors import DataError, EdgernnError

logger = logging.getLogger(__name__)

SEQ_MODULO = 1 << 16


@dataclasses.dataclass
class Played:
    """One recording as it went out.

    Attributes:
        index: Position of the recording in the dataset.
        stream_id: Stream it was played on.
        first_frame: Position of its first frame among all frames sent on its
            stream (0-based); the receiver's k-th prediction for the stream
            belongs to position k.
        frames: Its number of frames.
        label: Its true label ('' when unlabelled).
    """

    index: int
    stream_id: int
    first_frame: int
    frames: int
    label: str

    @property
    def last_frame(self) -> int:
        return self.first_frame + self.frames - 1


@dataclasses.dataclass
class ReplayResult:
    """Attributes:
    played: The recordings, in the order they started.
    frames: Data frames written.
    bytes: Bytes written.
    seconds: Wall time of the replay.
    write_times: per stream id, time.monotonic() when each of its frames was
        written, in order, for latency measurements (only when asked for).
    """

    played: list[Played]
    frames: int
    bytes: int
    seconds: float
    write_times: dict[int, list[float]]


class _Encoder:
    """Frames and markers in one wire format; tracks per-stream numbering."""

    def __init__(self, wire_format: str, payload: str, csv_reset_line: str,
                 with_stream_ids: bool):
        self.binary = wire_format == "binary"
        self.payload = payload
        self.csv_reset_line = csv_reset_line
        self.with_stream_ids = with_stream_ids
        self.seq: dict[int, int] = {}
        self.start_ms = time.monotonic()

    def frame(self, stream_id: int, values: np.ndarray) -> tuple[bytes, int]:
        seq = self.seq.get(stream_id, 0 if self.binary else 1)
        self.seq[stream_id] = (seq + 1) % SEQ_MODULO if self.binary else seq + 1
        if self.binary:
            sensor_ms = int((time.monotonic() - self.start_ms) * 1000) & 0xFFFFFFFF
            return encode_frame(stream_id, seq, values, payload=self.payload,
                                sensor_time_ms=sensor_ms), seq
        sid = stream_id if self.with_stream_ids else None
        return encode_csv_line(values, sid), seq

    def marker(self, stream_id: int) -> bytes:
        if self.binary:
            seq = self.seq.get(stream_id, 0)
            self.seq[stream_id] = (seq + 1) % SEQ_MODULO
            return encode_reset(stream_id, seq)
        sid = stream_id if self.with_stream_ids else None
        # The receiver's frame count restarts after a reset.
        self.seq[stream_id] = 1
        return encode_csv_reset(self.csv_reset_line, sid)


def replay(recordings: list[np.ndarray], labels: list[str], write: Callable[[bytes], Any],
           wire_format: str = "binary", payload: str = "float32",
           rate_hz: float = 10.0, speed: float = 1.0, streams: int = 1,
           csv_reset_line: str = "#reset", record_times: bool = False,
           progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Plays recordings through ``write``.

    Args:
        recordings: float32 (frames, channels) each.
        labels: True label per recording (or '').
        write: Takes bytes (a serial port's ``write``, a file's...).
        wire_format: ``binary`` or ``csv``.
        payload: ``float32`` or ``int16`` (binary only).
        rate_hz: The recording's own frame rate.
        speed: Multiple of rate_hz; 0 = no pacing.
        streams: Recordings played at once.
        csv_reset_line: The csv marker line.
        record_times: Fill :attr:`ReplayResult.write_times`.
        progress: Called as progress(frames_written, frames_total) now and then.
    """
    if streams < 1:
        raise EdgernnError(f"--streams must be >= 1, got {streams!r}")
    if not recordings:
        raise DataError("no recordings to replay")
    encoder = _Encoder(wire_format, payload, csv_reset_line,
                       with_stream_ids=streams > 1)
    pending = list(range(len(recordings)))
    active: dict[int, list] = {}  # stream id -> [recording index, next frame, Played]
    played: list[Played] = []
    write_times: dict[int, list[float]] = {}
    sent: dict[int, int] = {}  # frames sent per stream
    total = sum(len(r) for r in recordings)
    period_s = 1.0 / (rate_hz * speed) if speed > 0 else 0.0
    frames = written = tick = 0
    started = time.monotonic()

    def start_next(stream_id: int) -> None:
        index = pending.pop(0)
        active[stream_id] = [index, 0, None]

    for stream_id in range(min(streams, len(pending))):
        start_next(stream_id)
    # A csv receiver drops the partial line it joins in the middle of; an empty
    # first line makes that partial line empty, so no frame is lost.
    first = b"" if encoder.binary else b"\n"
    while active:
        chunk = bytearray(first)
        first = b""
        stamps = []
        for stream_id in sorted(active):
            entry = active[stream_id]
            index, t, record = entry
            data, _ = encoder.frame(stream_id, recordings[index][t])
            chunk += data
            stamps.append(stream_id)
            if record is None:
                record = entry[2] = Played(index, stream_id, sent.get(stream_id, 0),
                                           len(recordings[index]),
                                           labels[index] if labels else "")
                played.append(record)
            sent[stream_id] = sent.get(stream_id, 0) + 1
            entry[1] = t + 1
            frames += 1
            if entry[1] >= len(recordings[index]):
                chunk += encoder.marker(stream_id)
                del active[stream_id]
                if pending:
                    start_next(stream_id)
        if period_s:
            delay = started + tick * period_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        write(bytes(chunk))
        if record_times:
            now = time.monotonic()
            for stream_id in stamps:
                write_times.setdefault(stream_id, []).append(now)
        written += len(chunk)
        tick += 1
        if progress is not None and tick % 50 == 0:
            progress(frames, total)
    if progress is not None:
        progress(frames, total)
    return ReplayResult(played, frames, written, time.monotonic() - started, write_times)


def open_port(url: str, baudrate: int) -> Any:
    """Opens a pyserial URL for writing, with one clear error when it cannot."""
    import serial

    try:
        return serial.serial_for_url(url, baudrate=baudrate, write_timeout=10)
    except (serial.SerialException, OSError, ValueError) as e:
        raise EdgernnError(f"cannot open port {url!r}: {e}; check the device path "
                           "or URL (socket://HOST:PORT, rfc2217://HOST:PORT)") from e


def main_replay(args) -> int:
    """``edgernn replay``."""
    from edgernn import datasets

    name = str(args.data)
    if name.lower() in ("basicmotions", "pickupgesture"):
        train, test = datasets.load_builtin(name.lower())
        data = test if args.split == "test" else train
    else:
        data = datasets.read_dataset(name)
    recordings = data.sequences[:args.limit] if args.limit else data.sequences
    port = open_port(args.port, args.baudrate)

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r  {done}/{total} frames")
        sys.stderr.flush()

    try:
        result = replay(recordings, data.labels, port.write, args.format, args.payload,
                        args.rate_hz, args.speed, args.streams, args.csv_reset_line,
                        progress=show)
        port.flush()
    finally:
        port.close()
    sys.stderr.write("\n")
    print(f"replayed {len(result.played)} recordings, {result.frames} frames, "
          f"{result.bytes} bytes in {result.seconds:.2f} s to {args.port}")
    return 0
