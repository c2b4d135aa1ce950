"""The text wire format: one line of numbers per frame.

A line holds the channel values separated by commas, spaces or tabs, in any mix
and repeated, ended by ``\\n`` or ``\\r\\n``::

    0.01,-0.02,0.98          stream 0
    3, 0.01 -0.02	0.98      stream 3: one more field, a non-negative integer
    #reset                    resets stream 0
    #reset 3                  resets stream 3
    # anything else           a comment, counted in stats.ignored

csv carries no sequence number and no sensor time, so frames decode with
``seq=None`` and ``sensor_time_ms=None``; lost lines cannot be detected.
"""

from __future__ import annotations

import array
import logging
from collections.abc import Sequence

import numpy as np

from edgernnd.decode_stats import DecoderStats
from edgernnd.frames import Frame, FrameKind

logger = logging.getLogger(__name__)

MAX_STREAM_ID = 65535
_SEPARATORS = b" \t,"


class CsvDecoder:
    """Turns a byte stream of text lines into frames.

    Rejection reasons counted in ``stats.rejected``: ``'field_count'`` (neither
    ``channels`` nor ``channels + 1`` fields), ``'not_a_number'`` (a field float()
    cannot read; ``nan`` and ``inf`` are read and passed through), ``'stream_id'``
    (the extra leading field, or the id after the reset line, is not an integer in
    0..65535), ``'oversize'`` (a line over ``max_line_bytes``) and
    ``'partial_first_line'``. Comment lines are counted in ``stats.ignored``;
    blank lines are not counted at all.

    The decoder keeps at most ``max_line_bytes`` (plus a pending ``\\r``) between
    calls; a longer line is dropped up to its newline. It never raises on input.

    Args:
        channels: Values per line, >= 1.
        reset_line: The line that resets stream 0; followed by a separator and an
            id it resets that stream.
        max_line_bytes: Longest line accepted, line ending excluded.
        discard_first_line: Drop everything up to and including the first
            newline, because a port opened mid-line delivers a line's tail,
            which may look like a valid line with fewer digits.

    Raises:
        ValueError: ``channels`` < 1, ``max_line_bytes`` < 1, or ``reset_line`` is
            empty or holds a line break.
    """

    def __init__(
        self,
        channels: int,
        reset_line: str = "#reset",
        max_line_bytes: int = 1024,
        discard_first_line: bool = True,
    ):
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes!r}")
        if not reset_line.strip() or any(c in reset_line for c in "\r\n"):
            raise ValueError(
                f"reset_line must be non-empty text on one line, got {reset_line!r}"
            )
        self.channels = channels
        self.reset_line = reset_line
        self.max_line_bytes = max_line_bytes
        self.stats = DecoderStats()
        self._reset_bytes = reset_line.encode("utf-8")
        self._pending = b""
        # While skipping, bytes are dropped up to the next newline; the reason
        # is counted when the skip ends (first line) or starts (oversize).
        self._skipping = discard_first_line
        self._skipping_first_line = discard_first_line
        self._skipped_text = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an unfinished line; at most max_line_bytes + 1."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        """Decodes the lines completed by ``data``.

        Args:
            data: Bytes as read from the port, any length and split anywhere.

        Returns:
            The frames, in order: DATA with float32 values of shape (channels,),
            or RESET with empty values.
        """
        self.stats.bytes_in += len(data)
        data = bytes(data)
        if self._skipping:
            cut = data.find(b"\n")
            if self._skipping_first_line and data[: None if cut < 0 else cut].strip():
                self._skipped_text = True
            if cut < 0:
                return []
            data = data[cut + 1 :]
            self._stop_skipping()
        buffer = self._pending + data if self._pending else data

        lines = buffer.split(b"\n")
        tail = lines.pop()
        frames: list[Frame] = []
        for line in lines:
            self._decode_line(line, frames)

        if len(tail) > self.max_line_bytes + tail.endswith(b"\r"):
            self._reject("oversize", tail)
            tail = b""
            self._skipping = True
        self._pending = tail
        return frames

    def _stop_skipping(self) -> None:
        if self._skipping_first_line and self._skipped_text:
            self._reject("partial_first_line", b"")
        self._skipping = self._skipping_first_line = self._skipped_text = False

    def _decode_line(self, line: bytes, frames: list[Frame]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line_bytes:
            self._reject("oversize", line)
            return
        if not line.strip():
            return

        reset = self._reset_bytes
        if line.startswith(reset):
            rest = line[len(reset) :]
            if not rest or rest[:1] in (b" ", b"\t", b","):
                stream_id = _parse_stream_id(rest.strip(_SEPARATORS) or b"0")
                if stream_id is None:
                    self._reject("stream_id", line)
                    return
                empty = np.empty(0, np.float32)
                frames.append(Frame(stream_id, None, empty, FrameKind.RESET, None))
                self.stats.accepted += 1
                return
        if line.startswith(b"#"):
            self.stats.ignored["comment"] += 1
            return

        fields = line.replace(b",", b" ").split()
        stream_id = 0
        if len(fields) == self.channels + 1:
            stream_id = _parse_stream_id(fields.pop(0))
            if stream_id is None:
                self._reject("stream_id", line)
                return
        elif len(fields) != self.channels:
            self._reject("field_count", line)
            return
        try:
            # float() also reads '1_000'; an underscore is more likely line noise.
            if b"_" in line:
                raise ValueError(line)
            numbers = [float(f) for f in fields]
        except ValueError:
            self._reject("not_a_number", line)
            return
        # array('f') rounds to float32 like numpy, but turns out-of-range values
        # into inf without a RuntimeWarning.
        values = np.frombuffer(array.array("f", numbers), np.float32)
        frames.append(Frame(stream_id, None, values, FrameKind.DATA, None))
        self.stats.accepted += 1

    def _reject(self, reason: str, line: bytes) -> None:
        self.stats.rejected[reason] += 1
        logger.debug("rejected line (%s): %d bytes %r", reason, len(line), line[:40])


def _parse_stream_id(field: bytes) -> int | None:
    if not field.isdigit() or len(field) > 5:
        return None
    value = int(field)
    return value if value <= MAX_STREAM_ID else None


def format_float32(value: float | np.float32) -> str:
    """The shortest text that float() reads back as the same float32.

    ``value`` is first rounded to float32 (beyond its range: to inf); ``nan``,
    ``inf`` and ``-inf`` are written as such.
    """
    single = np.frombuffer(array.array("f", [float(value)]), np.float32)[0]
    text = str(single)  # numpy prints the shortest float32 round-trip digits
    back = np.float32(float(text))
    if back.tobytes() != single.tobytes() and not np.isnan(single):
        # Reading goes through float64 first; should a rounding tie ever defeat
        # the short form, the float64 repr of the same value is exact.
        text = repr(float(single))
    return text


def encode_csv_line(
    values: Sequence[float] | np.ndarray, stream_id: int | None = None
) -> bytes:
    """One csv line for :class:`CsvDecoder`, ending in ``\\n``.

    Args:
        values: Shape (channels,); each is rounded to float32 and written so that
            it decodes to exactly that float32.
        stream_id: 0..65535 to prefix the line with, or None for stream 0.

    Raises:
        ValueError: ``stream_id`` is out of range or ``values`` is not 1-D.
    """
    flat = np.asarray(values, dtype=np.float64)
    if flat.ndim != 1:
        raise ValueError(f"values must have shape (n,), got {flat.shape}")
    fields = [format_float32(v) for v in flat.tolist()]
    if stream_id is not None:
        fields.insert(0, str(_check_stream_id(stream_id)))
    return (",".join(fields) + "\n").encode("ascii")


def encode_csv_reset(reset_line: str = "#reset", stream_id: int | None = None) -> bytes:
    """The line that resets stream 0 (``stream_id=None``) or ``stream_id``."""
    if stream_id is None:
        return (reset_line + "\n").encode("utf-8")
    return f"{reset_line} {_check_stream_id(stream_id)}\n".encode()


def _check_stream_id(stream_id: int) -> int:
    if isinstance(stream_id, bool) or not isinstance(stream_id, (int, np.integer)):
        raise ValueError(f"stream_id must be an integer, got {stream_id!r}")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream_id must be in 0..{MAX_STREAM_ID}, got {stream_id!r}")
    return int(stream_id)
