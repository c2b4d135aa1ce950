"""The binary wire format: COBS-framed, CRC-checked sensor frames.

A raw frame, all integers little-endian except the CRC::

    offset size field
    0      1    protocol version, 1
    1      1    payload type: 0 reset, 1 float32, 2 int16 with per-channel exponent
    2      2    stream id, uint16
    4      2    sequence number, uint16, wrapping
    6      4    sensor time in milliseconds, uint32, wrapping
    10     1    channel count n, 0..64 (0 for reset)
    11     ..   payload: type 1: n float32; type 2: n int8 exponents e_i, then
                n int16 mantissas q_i, value_i = q_i * 2**e_i
    end    2    CRC-16/CCITT-FALSE of all preceding bytes, big-endian

On the wire the raw frame is COBS-encoded (so it holds no zero byte) and followed
by one 0x00 delimiter. docs/wire-protocol.md has a worked example; the C header
device/firmware/edgernn_frame.h builds the same bytes on a microcontroller.

The decoder is pure: it takes bytes and returns :class:`~edgernnd.frames.Frame`
records, counting every rejected frame by reason in :class:`DecoderStats`.
"""

from __future__ import annotations

import array
import binascii
import enum
import logging
import math
import struct
from collections.abc import Sequence

import numpy as np

from edgernnd.decode_stats import DecoderStats
from edgernnd.frames import Frame, FrameKind

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_CHANNELS = 64
HEADER_BYTES = 11
CRC_BYTES = 2
DELIMITER = b"\x00"


class PayloadType(enum.IntEnum):
    """Byte 1 of a raw frame."""

    RESET = 0
    FLOAT32 = 1
    INT16 = 2


_HEADER = struct.Struct("<BBHHIB")
_F32_LE = np.dtype("<f4")
_I16_LE = np.dtype("<i2")
_MIN_RAW_BYTES = HEADER_BYTES + CRC_BYTES
# Mantissas are at most 2**15, so q * 2**e cannot overflow float32 (max just
# below 2**128) unless e > 128 - 15; only then is the overflow warning silenced.
_SAFE_MAX_EXPONENT = 128 - 15


def crc16_ccitt_false(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, xorout 0.

    Args:
        data: The bytes to check.
        crc: The running CRC, to continue over several pieces.

    Returns:
        The CRC, 0..65535. ``crc16_ccitt_false(b"123456789") == 0x29B1``.
    """
    # binascii.crc_hqx is the same polynomial without reflection, computed in C;
    # only the initial value differs from its usual (XMODEM) use.
    return binascii.crc_hqx(data, crc)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: returns ``data`` without zero bytes.

    The result is at most ``len(data) + len(data) // 254 + 1`` bytes long and
    never contains 0x00. The delimiter is not appended.
    """
    out = bytearray()
    for piece in bytes(data).split(b"\x00"):
        # Each piece but the last was followed by a zero, which the decoder
        # restores after every block shorter than 254 bytes; a full 254-byte
        # block (code 0xFF) implies no zero, so long pieces end with a short block.
        while len(piece) >= 254:
            out.append(0xFF)
            out += piece[:254]
            piece = piece[254:]
        out.append(len(piece) + 1)
        out += piece
    return bytes(out)


def _cobs_decode(chunk: bytes) -> bytearray | None:
    """Decodes a zero-free COBS chunk; None when the block codes do not fit it."""
    out = bytearray()
    size = len(chunk)
    i = 0
    while i < size:
        code = chunk[i]
        end = i + code
        if code == 0 or end > size:
            return None
        out += chunk[i + 1 : end]
        i = end
        if code != 0xFF and i < size:
            out.append(0)
    return out


def cobs_decode(data: bytes) -> bytes:
    """Reverses :func:`cobs_encode`.

    Args:
        data: One encoded frame without its delimiter.

    Raises:
        ValueError: ``data`` is empty, holds a zero byte, or a block code points
            past its end.
    """
    data = bytes(data)
    if not data:
        raise ValueError("cobs_decode: empty input; an encoded frame has >= 1 byte")
    if 0 in data:
        raise ValueError(
            f"cobs_decode: zero byte at offset {data.index(0)}; strip the delimiter"
        )
    out = _cobs_decode(data)
    if out is None:
        raise ValueError(f"cobs_decode: a block code runs past the end of {data!r}")
    return bytes(out)


def max_encoded_frame_bytes(channels: int = MAX_CHANNELS) -> int:
    """Longest encoded float32 frame of ``channels`` values, without delimiter."""
    raw = HEADER_BYTES + 4 * channels + CRC_BYTES
    return raw + raw // 254 + 1


def _check_uint(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be in 0..{(1 << bits) - 1}, got {value!r}")


def _frame_bytes(
    ptype: PayloadType,
    stream_id: int,
    seq: int,
    sensor_time_ms: int,
    channels: int,
    payload: bytes,
) -> bytes:
    _check_uint("stream_id", stream_id, 16)
    for name, value in (("seq", seq), ("sensor_time_ms", sensor_time_ms)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    header = _HEADER.pack(
        PROTOCOL_VERSION,
        ptype,
        stream_id,
        int(seq) & 0xFFFF,
        int(sensor_time_ms) & 0xFFFFFFFF,
        channels,
    )
    body = header + payload
    raw = body + crc16_ccitt_false(body).to_bytes(2, "big")
    return cobs_encode(raw) + DELIMITER


def quantize_int16(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Chooses per-channel exponents for the int16 payload.

    Each value v becomes q * 2**e with |q| <= 32767 and the smallest exponent
    e >= -128 that allows it, so q keeps 15 significant bits (rounded half to
    even). Zero is sent as q = 0, e = 0.

    Args:
        values: Finite numbers, shape (n,).

    Returns:
        (exponents int8 shape (n,), mantissas int16 shape (n,)).

    Raises:
        ValueError: A value is not finite or too large (|v| >= 2**142).
    """
    exponents = []
    mantissas = []
    for i, v in enumerate(float(x) for x in values):
        if not math.isfinite(v):
            raise ValueError(
                f"values[{i}] is {v!r}; the int16 payload carries only finite "
                "values, use payload='float32' to send nan or inf"
            )
        if v == 0.0:
            e, q = 0, 0
        else:
            # |v| < 2**x, so |v / 2**(x - 15)| < 2**15; rounding may reach
            # 32768 exactly, then one more bit of exponent is needed.
            e = max(math.frexp(v)[1] - 15, -128)
            q = round(math.ldexp(v, -e))
            if abs(q) > 32767:
                e += 1
                q = round(math.ldexp(v, -e))
        if e > 127:
            raise ValueError(f"values[{i}] = {v!r} is too large for the int16 payload")
        exponents.append(e)
        mantissas.append(q)
    return np.array(exponents, np.int8), np.array(mantissas, np.int16)


def encode_frame(
    stream_id: int,
    seq: int,
    values: Sequence[float] | np.ndarray,
    *,
    payload: str = "float32",
    sensor_time_ms: int = 0,
) -> bytes:
    """Builds one DATA frame as sent on the wire.

    Args:
        stream_id: 0..65535.
        seq: Sequence number; taken modulo 65536 so a running counter may be given.
        values: Sensor values, shape (n,) with n <= 64. For ``float32`` they are
            rounded to float32 and nan/inf pass through.
        payload: ``"float32"`` or ``"int16"`` (15-bit mantissa and a per-channel
            exponent chosen by :func:`quantize_int16`).
        sensor_time_ms: The sender's clock; taken modulo 2**32.

    Returns:
        COBS-encoded frame followed by the 0x00 delimiter.

    Raises:
        ValueError: An argument is out of range, or an int16 value is not finite.
    """
    flat = np.asarray(values, dtype=np.float64)
    if flat.ndim != 1 or flat.size > MAX_CHANNELS:
        raise ValueError(
            f"values must have shape (n,) with n <= {MAX_CHANNELS}, got {flat.shape}"
        )
    if payload == "float32":
        # array('f') rounds out-of-range values to inf without numpy's warning.
        single = np.frombuffer(array.array("f", flat.tolist()), np.float32)
        ptype, data = PayloadType.FLOAT32, single.astype(_F32_LE).tobytes()
    elif payload == "int16":
        exponents, mantissas = quantize_int16(flat)
        ptype = PayloadType.INT16
        data = exponents.tobytes() + mantissas.astype(_I16_LE).tobytes()
    else:
        raise ValueError(f"payload must be 'float32' or 'int16', got {payload!r}")
    return _frame_bytes(ptype, stream_id, seq, sensor_time_ms, flat.size, data)


def encode_reset(stream_id: int, seq: int, sensor_time_ms: int = 0) -> bytes:
    """Builds a RESET frame (the sender starts a new recording on this stream).

    Arguments and result as for :func:`encode_frame`, without values.
    """
    return _frame_bytes(PayloadType.RESET, stream_id, seq, sensor_time_ms, 0, b"")


class BinaryDecoder:
    """Turns a byte stream into frames; resynchronises on every 0x00.

    Rejection reasons counted in ``stats.rejected``: ``'cobs'`` (block codes do
    not fit), ``'short'`` (under 13 decoded bytes), ``'crc'``, ``'version'``,
    ``'payload_type'``, ``'length'`` (channel count over 64, size not matching
    the count, or a reset with values), ``'width'`` (channel count differs from
    ``channels``), ``'oversize'`` (more than ``max_frame_bytes`` before a
    delimiter). The bytes before the first delimiter are usually the tail of a
    frame sent before the port was opened and count as one rejection.

    The decoder keeps at most ``max_frame_bytes`` bytes between calls: a longer
    run without delimiter is dropped up to the next 0x00. It never raises on
    input and logs rejections at DEBUG; reporting rates is the caller's job.

    Args:
        channels: The expected channel count of DATA frames, or None for any.
        max_frame_bytes: Longest encoded frame accepted, delimiter excluded.

    Raises:
        ValueError: ``channels`` is not 0..64, or ``max_frame_bytes`` is too small
            for a frame of ``channels`` float32 values.
    """

    def __init__(self, channels: int | None = None, max_frame_bytes: int = 400):
        if channels is not None and not 0 <= channels <= MAX_CHANNELS:
            raise ValueError(
                f"channels must be None or 0..{MAX_CHANNELS}, got {channels!r}"
            )
        # With no width given, only a reset frame is sure to be needed.
        needed = max_encoded_frame_bytes(channels or 0)
        if max_frame_bytes < needed:
            raise ValueError(
                f"max_frame_bytes must be >= {needed} for channels={channels!r}, "
                f"got {max_frame_bytes!r}"
            )
        self.channels = channels
        self.max_frame_bytes = max_frame_bytes
        self.stats = DecoderStats()
        self._pending = b""
        self._discarding = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an unfinished frame; never more than max_frame_bytes."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        """Decodes the frames completed by ``data``.

        Args:
            data: Bytes as read from the port, any length and split anywhere.

        Returns:
            The valid frames, in order. Their ``values`` are float32 arrays of
            shape (n,), writable, not shared with other frames; empty for RESET.
        """
        data = bytes(data)  # no copy when it already is bytes
        self.stats.bytes_in += len(data)
        if self._discarding:
            cut = data.find(DELIMITER)
            if cut < 0:
                return []
            self._discarding = False
            buffer = data[cut + 1 :]
        elif self._pending:
            buffer = self._pending + data
        else:
            buffer = data

        chunks = buffer.split(DELIMITER)
        tail = chunks.pop()
        frames = []
        if chunks:
            self._decode_chunks(chunks, frames)

        if len(tail) > self.max_frame_bytes:
            self._reject("oversize", tail)
            tail = b""
            self._discarding = True
        self._pending = tail
        return frames

    def _decode_chunks(self, chunks: list[bytes], frames: list[Frame]) -> None:
        # The hot loop: locals only, one pass per frame, no per-byte work but COBS.
        max_bytes = self.max_frame_bytes
        channels = self.channels
        crc_hqx = binascii.crc_hqx
        unpack_header = _HEADER.unpack_from
        frombuffer = np.frombuffer
        data_kind = FrameKind.DATA
        accepted = 0
        for chunk in chunks:
            if not chunk:
                continue
            if len(chunk) > max_bytes:
                self._reject("oversize", chunk)
                continue
            raw = _cobs_decode(chunk)
            if raw is None:
                self._reject("cobs", chunk)
                continue
            size = len(raw)
            if size < _MIN_RAW_BYTES:
                self._reject("short", chunk)
                continue
            # A CRC without reflection or final xor, run over the message and its
            # own big-endian CRC, leaves zero.
            if crc_hqx(raw, 0xFFFF):
                self._reject("crc", chunk)
                continue
            # Zero bytes appended after a valid CRC leave it zero, so the exact
            # size checks below are what rejects a chunk that gained some.
            version, ptype, stream_id, seq, time_ms, n = unpack_header(raw)
            if version != PROTOCOL_VERSION:
                self._reject("version", chunk)
                continue
            if ptype == PayloadType.FLOAT32:
                if n > MAX_CHANNELS or size != _MIN_RAW_BYTES + 4 * n:
                    self._reject("length", chunk)
                    continue
                values = frombuffer(raw, _F32_LE, n, HEADER_BYTES)
            elif ptype == PayloadType.INT16:
                if n > MAX_CHANNELS or size != _MIN_RAW_BYTES + 3 * n:
                    self._reject("length", chunk)
                    continue
                values = _dequantize(raw, n)
            elif ptype == PayloadType.RESET:
                if n != 0 or size != _MIN_RAW_BYTES:
                    self._reject("length", chunk)
                    continue
                empty = np.empty(0, np.float32)
                frames.append(Frame(stream_id, seq, empty, FrameKind.RESET, time_ms))
                accepted += 1
                continue
            else:
                self._reject("payload_type", chunk)
                continue
            if channels is not None and n != channels:
                self._reject("width", chunk)
                continue
            frames.append(Frame(stream_id, seq, values, data_kind, time_ms))
            accepted += 1
        self.stats.accepted += accepted

    def _reject(self, reason: str, chunk: bytes) -> None:
        self.stats.rejected[reason] += 1
        logger.debug("rejected frame (%s): %d bytes %r", reason, len(chunk), chunk[:16])


def _dequantize(raw: bytearray, n: int) -> np.ndarray:
    """value_i = q_i * 2**e_i as float32, shape (n,); exact unless it overflows."""
    exponents = np.frombuffer(raw, np.int8, n, HEADER_BYTES)
    mantissas = np.frombuffer(raw, _I16_LE, n, HEADER_BYTES + n).astype(np.float32)
    if n and exponents.max() > _SAFE_MAX_EXPONENT:
        with np.errstate(over="ignore"):
            return np.ldexp(mantissas, exponents)
    return np.ldexp(mantissas, exponents)
