"""Tests of the binary wire format: byte-exact units, the C header, and the fuzz suite.

The property tests run with fixed seeds (derandomize) and a bounded number of
examples so that CI time stays bounded and a failure reproduces everywhere.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgernnd.binary_codec import (
    BinaryDecoder,
    cobs_decode,
    cobs_encode,
    crc16_ccitt_false,
    encode_frame,
    encode_reset,
    max_encoded_frame_bytes,
    quantize_int16,
)
from edgernnd.frames import Frame, FrameKind

FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "device" / "firmware"
FUZZ = settings(
    derandomize=True,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# docs/wire-protocol.md walks through this frame byte by byte.
WORKED_EXAMPLE = bytes.fromhex(
    "04 01 01 03 02 07 03 d2 04 01 02 03 01 03 c0 3f 01 03 10 c0 01 05 7a 44 5e 89 00"
)


def wrap_raw(body: bytes) -> bytes:
    """A raw frame body (no CRC) as it goes on the wire: CRC, COBS, delimiter."""
    raw = body + crc16_ccitt_false(body).to_bytes(2, "big")
    return cobs_encode(raw) + b"\x00"


def header(ptype: int, n: int, version: int = 1, stream_id: int = 1, seq: int = 2):
    return struct.pack("<BBHHIB", version, ptype, stream_id, seq, 3, n)


def assert_same_frames(got: list[Frame], expected: list[Frame]) -> None:
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected, strict=True):
        assert (g.stream_id, g.seq, g.kind, g.sensor_time_ms) == (
            e.stream_id,
            e.seq,
            e.kind,
            e.sensor_time_ms,
        )
        assert g.values.dtype == np.float32
        assert np.array_equal(g.values, e.values, equal_nan=True), (g, e)
        assert np.array_equal(np.signbit(g.values), np.signbit(e.values))


def data_frame(stream_id, seq, values, time_ms=0) -> Frame:
    values = np.asarray(values, np.float32)
    return Frame(stream_id, seq, values, FrameKind.DATA, time_ms)


def reset_frame(stream_id, seq, time_ms=0) -> Frame:
    return Frame(stream_id, seq, np.empty(0, np.float32), FrameKind.RESET, time_ms)


def assert_counts_add_up(decoder: BinaryDecoder, returned: int) -> None:
    stats = decoder.stats
    assert stats.accepted == returned
    assert stats.frames_in == stats.accepted + sum(stats.rejected.values())
    assert set(stats.rejected) <= {
        "cobs", "short", "crc", "version", "payload_type", "length", "width",
        "oversize",
    }


# --- CRC and COBS -----------------------------------------------------------------


def test_crc16_ccitt_false_check_value():
    assert crc16_ccitt_false(b"123456789") == 0x29B1
    assert crc16_ccitt_false(b"") == 0xFFFF


def test_crc16_ccitt_false_continues_over_pieces():
    assert crc16_ccitt_false(b"6789", crc16_ccitt_false(b"12345")) == 0x29B1


@pytest.mark.parametrize(
    "raw, encoded",
    [
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
        (b"", b"\x01"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
        (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
        (bytes(range(1, 255)) + b"\x00", b"\xff" + bytes(range(1, 255)) + b"\x01\x01"),
    ],
)
def test_cobs_encode_known_vectors(raw, encoded):
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@pytest.mark.parametrize("bad", [b"", b"\x05\x11\x22", b"\x02\x00", b"\x03\x11"])
def test_cobs_decode_rejects_invalid(bad):
    with pytest.raises(ValueError, match="cobs_decode"):
        cobs_decode(bad)


@FUZZ
@given(st.binary(max_size=700))
def test_cobs_round_trip_has_no_zero_and_bounded_overhead(raw):
    encoded = cobs_encode(raw)
    assert 0 not in encoded
    assert len(encoded) <= len(raw) + len(raw) // 254 + 1
    assert cobs_decode(encoded) == raw


# --- Encoding ---------------------------------------------------------------------


def test_encode_frame_matches_worked_example():
    assert encode_frame(3, 7, [1.5, -2.25, 1000.0], sensor_time_ms=1234) == (
        WORKED_EXAMPLE
    )
    raw = cobs_decode(WORKED_EXAMPLE[:-1])
    assert raw[:11] == bytes.fromhex("01 01 0300 0700 d2040000 03")
    assert raw[11:23] == struct.pack("<3f", 1.5, -2.25, 1000.0)
    assert raw[-2:] == crc16_ccitt_false(raw[:-2]).to_bytes(2, "big")


def test_encode_frame_int16_layout():
    wire = encode_frame(1, 2, [1.5, -2.25], payload="int16", sensor_time_ms=3)
    raw = cobs_decode(wire[:-1])
    assert raw[:11] == header(2, 2)
    assert raw[11:13] == struct.pack("<2b", -14, -13)
    assert raw[13:17] == struct.pack("<2h", 24576, -18432)
    assert len(raw) == 19


def test_encode_reset_layout():
    raw = cobs_decode(encode_reset(1, 2, sensor_time_ms=3)[:-1])
    assert raw == header(0, 0) + crc16_ccitt_false(header(0, 0)).to_bytes(2, "big")


def test_encode_frame_wraps_seq_and_time():
    wrapped = encode_frame(0, 65536 + 5, [1.0], sensor_time_ms=2**32 + 9)
    assert wrapped == encode_frame(0, 5, [1.0], sensor_time_ms=9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stream_id": 65536}, "stream_id"),
        ({"stream_id": -1}, "stream_id"),
        ({"values": np.zeros(65)}, "shape"),
        ({"values": np.zeros((2, 3))}, "shape"),
        ({"payload": "int8"}, "payload"),
        ({"payload": "int16", "values": [1.0, float("nan")]}, r"values\[1\]"),
        ({"payload": "int16", "values": [float("inf")]}, "finite"),
        ({"payload": "int16", "values": [2.0**142]}, "too large"),
    ],
)
def test_encode_frame_rejects_bad_arguments(kwargs, match):
    args = {"stream_id": 0, "seq": 0, "values": [1.0]} | kwargs
    with pytest.raises(ValueError, match=match):
        encode_frame(args.pop("stream_id"), args.pop("seq"), args.pop("values"), **args)


def test_quantize_int16_chooses_smallest_exponent():
    exponents, mantissas = quantize_int16([1.5, 32767.0, 32767.5, -1e-3, 0.0, 1e-45])
    assert exponents.tolist() == [-14, 0, 1, -24, 0, -128]
    assert mantissas.tolist() == [24576, 32767, 16384, -16777, 0, 0]


@FUZZ
@given(
    st.lists(
        st.floats(min_value=-(2.0**99), max_value=2.0**99, width=32),
        max_size=64,
    )
)
def test_quantize_int16_keeps_fifteen_bits(values):
    decoded = BinaryDecoder().feed(encode_frame(0, 0, values, payload="int16"))
    got = decoded[0].values.astype(np.float64)
    want = np.asarray(values, np.float64)
    # Relative error at most half a unit in 15 bits, or the absolute floor of
    # exponent -128 for tiny values.
    tolerance = np.maximum(np.abs(want) * 2.0**-15, 2.0**-129)
    assert np.all(np.abs(got - want) <= tolerance)


# --- Decoding ---------------------------------------------------------------------


def test_decoder_returns_frames_with_fields():
    wire = (
        encode_reset(3, 6, sensor_time_ms=1200)
        + WORKED_EXAMPLE
        + encode_frame(9, 65535, [0.5, -4.0, 0.0], payload="int16", sensor_time_ms=7)
    )
    decoder = BinaryDecoder(channels=3)
    frames = decoder.feed(wire)
    assert_same_frames(
        frames,
        [
            reset_frame(3, 6, 1200),
            data_frame(3, 7, [1.5, -2.25, 1000.0], 1234),
            data_frame(9, 65535, [0.5, -4.0, 0.0], 7),
        ],
    )
    assert decoder.stats.accepted == 3
    assert decoder.stats.bytes_in == len(wire)
    assert frames[1].values.flags.writeable


def test_decoder_passes_non_finite_float32_through():
    values = [float("nan"), float("inf"), float("-inf"), 1e39]
    frames = BinaryDecoder().feed(encode_frame(0, 0, values))
    got = frames[0].values
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf
    assert got[3] == np.inf  # beyond float32: rounds to inf


def test_decoder_int16_overflowing_exponent_gives_inf():
    body = header(2, 2) + struct.pack("<2b2h", 127, 0, 32767, -3)
    frames = BinaryDecoder().feed(wrap_raw(body))
    assert frames[0].values.tolist() == [np.inf, -3.0]


REJECTION_CASES = [
    (b"\x05\x01\x00", "cobs"),
    (cobs_encode(b"\x01\x01\x00\x00") + b"\x00", "short"),
    (cobs_encode(header(1, 1) + struct.pack("<f", 1.0) + b"\x12\x34") + b"\x00", "crc"),
    (wrap_raw(header(1, 1, version=2) + struct.pack("<f", 1.0)), "version"),
    (wrap_raw(header(3, 0)), "payload_type"),
    (wrap_raw(header(1, 65) + bytes(4 * 65)), "length"),
    (wrap_raw(header(1, 2) + struct.pack("<f", 1.0)), "length"),
    (wrap_raw(header(2, 2) + bytes(4)), "length"),
    (wrap_raw(header(0, 1) + struct.pack("<f", 1.0)), "length"),
    (wrap_raw(header(0, 0) + b"\x01"), "length"),
    # A stray 0x01 before the delimiter decodes to a trailing zero, which leaves
    # this CRC (no final xor) at zero: only the size check catches it.
    (WORKED_EXAMPLE[:-1] + b"\x01\x00", "length"),
    (encode_frame(0, 0, [1.0, 2.0]), "width"),
    (b"\x01" * 401 + b"\x00", "oversize"),
]


@pytest.mark.parametrize(
    "wire, reason",
    REJECTION_CASES,
    ids=[f"{reason}{i}" for i, (_, reason) in enumerate(REJECTION_CASES)],
)
def test_decoder_rejects_with_reason(wire, reason):
    decoder = BinaryDecoder(channels=3)
    follower = encode_frame(5, 5, [1.0, 2.0, 3.0])
    frames = decoder.feed(wire + follower)
    assert decoder.stats.rejected == {reason: 1}
    assert_same_frames(frames, [data_frame(5, 5, [1.0, 2.0, 3.0])])


def test_decoder_ignores_empty_chunks():
    decoder = BinaryDecoder()
    frames = decoder.feed(b"\x00\x00" + WORKED_EXAMPLE + b"\x00\x00\x00")
    assert len(frames) == 1
    assert decoder.stats.frames_in == 1 and not decoder.stats.rejected


def test_decoder_counts_partial_frame_at_start_once():
    decoder = BinaryDecoder()
    assert decoder.feed(WORKED_EXAMPLE[9:] + WORKED_EXAMPLE) != []
    assert decoder.stats.accepted == 1
    assert decoder.stats.frames_in == 2


def test_decoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        BinaryDecoder(channels=65)
    with pytest.raises(ValueError, match="max_frame_bytes must be >= 38"):
        BinaryDecoder(channels=6, max_frame_bytes=37)
    assert BinaryDecoder(channels=6, max_frame_bytes=38).max_frame_bytes == 38
    assert max_encoded_frame_bytes(64) == 271


def test_decoder_discards_oversize_run_and_resyncs():
    decoder = BinaryDecoder(max_frame_bytes=100)
    frames = []
    for _ in range(1000):  # 100 kB without a delimiter
        frames += decoder.feed(b"\x55" * 100)
        assert decoder.buffered_bytes <= 100
    frames += decoder.feed(b"\x55\x00" + WORKED_EXAMPLE)
    assert len(frames) == 1
    assert decoder.stats.rejected == {"oversize": 1}
    assert decoder.stats.bytes_in == 100_002 + len(WORKED_EXAMPLE)


def test_decoder_accepts_frame_split_at_every_position():
    wire = encode_reset(1, 0) + WORKED_EXAMPLE + encode_frame(2, 1, [0.0] * 64)
    expected = BinaryDecoder().feed(wire)
    assert len(expected) == 3
    for cut in range(len(wire) + 1):
        decoder = BinaryDecoder()
        frames = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        assert_same_frames(frames, expected)
        assert decoder.stats.frames_in == 3


def test_decoder_accepts_one_byte_at_a_time():
    wire = WORKED_EXAMPLE * 3 + encode_frame(0, 0, [1.0] * 64, payload="int16")
    decoder = BinaryDecoder()
    frames = [f for i in range(len(wire)) for f in decoder.feed(wire[i : i + 1])]
    assert len(frames) == 4 and decoder.stats.frames_in == 4


def test_decoder_rejects_every_truncation():
    whole = WORKED_EXAMPLE[:-1]
    follower = encode_frame(1, 1, [2.0])
    for length in range(1, len(whole)):
        decoder = BinaryDecoder()
        frames = decoder.feed(whole[:length] + b"\x00" + follower)
        assert_same_frames(frames, [data_frame(1, 1, [2.0])])
        assert decoder.stats.frames_in == 2


def test_decoder_rejects_truncation_merged_with_next_frame():
    # A sender that restarts mid-frame without a delimiter costs two frames.
    decoder = BinaryDecoder()
    follower = encode_frame(1, 1, [2.0])
    frames = decoder.feed(WORKED_EXAMPLE[:10] + follower + follower)
    assert_same_frames(frames, [data_frame(1, 1, [2.0])])
    assert sum(decoder.stats.rejected.values()) == 1


# Frames whose single-bit flips are all tried: a float32 and an int16 frame,
# a reset, and a 64-channel frame long enough to need two COBS blocks of 254.
FLIP_FRAMES = [
    WORKED_EXAMPLE,
    encode_frame(0, 0, [0.0, 1.0, -0.5, 1e-3, 0.0, 7.0], sensor_time_ms=0),
    encode_frame(65535, 255, [1.5, -2.25, 0.0], payload="int16", sensor_time_ms=1),
    encode_reset(0, 0),
    encode_frame(513, 4, np.linspace(1, 2, 64), sensor_time_ms=2**31),
]


@pytest.mark.parametrize("target", FLIP_FRAMES, ids=range(len(FLIP_FRAMES)))
def test_decoder_catches_every_single_bit_flip(target):
    before = encode_frame(1, 1, [1.0, 2.0])
    after = encode_frame(2, 2, [3.0])
    expected_before, expected_after = BinaryDecoder().feed(before + after)
    for bit in range(8 * len(target)):
        corrupt = bytearray(target)
        corrupt[bit // 8] ^= 1 << (bit % 8)
        decoder = BinaryDecoder()
        frames = decoder.feed(before + bytes(corrupt) + after)

        # A flipped delimiter merges the target with the next frame: both are
        # lost, as one rejection. Any other flip costs the target alone.
        if bit // 8 == len(target) - 1:
            assert_same_frames(frames, [expected_before])
        else:
            assert_same_frames(frames, [expected_before, expected_after])
        assert sum(decoder.stats.rejected.values()) >= 1
        assert_counts_add_up(decoder, len(frames))


# --- Fuzz properties --------------------------------------------------------------

stream_ids = st.integers(0, 65535)
seqs = st.integers(0, 65535)
times = st.integers(0, 2**32 - 1)


@st.composite
def wire_frames(draw) -> tuple[bytes, Frame]:
    """A random valid frame: its wire bytes and the frame it must decode to."""
    kind = draw(st.sampled_from(["float32", "int16", "reset"]))
    sid, seq, time_ms = draw(stream_ids), draw(seqs), draw(times)
    if kind == "reset":
        return encode_reset(sid, seq, time_ms), reset_frame(sid, seq, time_ms)
    n = draw(st.integers(0, 64))
    if kind == "float32":
        values = draw(st.lists(st.floats(width=32), min_size=n, max_size=n))
        expected = np.asarray(values, np.float32)
    else:
        # Values a sender would quantize exactly: q * 2**e.
        qs = draw(st.lists(st.integers(-32767, 32767), min_size=n, max_size=n))
        es = draw(st.lists(st.integers(-30, 30), min_size=n, max_size=n))
        values = [q * 2.0**e for q, e in zip(qs, es, strict=True)]
        expected = np.asarray(values, np.float32)
    wire = encode_frame(sid, seq, values, payload=kind, sensor_time_ms=time_ms)
    return wire, Frame(sid, seq, expected, FrameKind.DATA, time_ms)


def split_points(draw, length: int) -> list[int]:
    cuts = draw(st.lists(st.integers(0, length), max_size=8))
    return sorted(set(cuts))


def feed_in_pieces(decoder: BinaryDecoder, wire: bytes, cuts: list[int]) -> list:
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        frames += decoder.feed(wire[start:end])
        assert decoder.buffered_bytes <= decoder.max_frame_bytes
    return frames


@FUZZ
@given(st.data(), st.binary(max_size=2000), st.integers(14, 120))
def test_decoder_survives_random_bytes(data, wire, max_frame_bytes):
    decoder = BinaryDecoder(max_frame_bytes=max_frame_bytes)
    frames = feed_in_pieces(decoder, wire, split_points(data.draw, len(wire)))

    chunks = wire.split(b"\x00")
    tail = chunks.pop()
    expected_in = sum(1 for c in chunks if c) + (len(tail) > max_frame_bytes)
    assert decoder.stats.frames_in == expected_in
    assert decoder.stats.bytes_in == len(wire)
    assert_counts_add_up(decoder, len(frames))


@FUZZ
@given(st.data(), st.lists(wire_frames(), max_size=12))
def test_decoder_returns_valid_frames_however_split(data, items):
    wire = b"".join(w for w, _ in items)
    decoder = BinaryDecoder()
    frames = feed_in_pieces(decoder, wire, split_points(data.draw, len(wire)))
    assert_same_frames(frames, [f for _, f in items])
    assert not decoder.stats.rejected


@FUZZ
@given(st.data(), st.lists(wire_frames(), min_size=1, max_size=6))
def test_decoder_passes_duplicated_and_reordered_frames(data, items):
    # The decoder does not judge order; the daemon's sequence check does.
    order = data.draw(
        st.lists(st.integers(0, len(items) - 1), min_size=1, max_size=15)
    )
    wire = b"".join(items[i][0] for i in order)
    frames = BinaryDecoder().feed(wire)
    assert_same_frames(frames, [items[i][1] for i in order])


@st.composite
def corrupted_streams(draw):
    """Valid frames, some damaged (bit flips, cuts, junk, oversize runs)."""
    items = draw(st.lists(wire_frames(), min_size=1, max_size=8))
    pieces, damaged = [], []
    for wire, _ in items:
        body = bytearray(wire[:-1])
        how = draw(st.sampled_from(["none", "none", "flip", "cut", "junk", "long"]))
        if how == "flip":
            for _ in range(draw(st.integers(1, 3))):
                bit = draw(st.integers(0, 8 * len(body) - 1))
                body[bit // 8] ^= 1 << (bit % 8)
        elif how == "cut":
            body = body[: draw(st.integers(0, len(body) - 1))]
        elif how == "junk":
            body += draw(st.binary(min_size=1, max_size=30)).replace(b"\x00", b"\x01")
        elif how == "long":
            body = bytearray(b"\xaa" * draw(st.integers(401, 1500)))
        pieces.append(bytes(body) + b"\x00")
        damaged.append(bytes(body) != wire[:-1])  # two flips may cancel out
    return items, pieces, damaged


@FUZZ
@given(st.data(), corrupted_streams())
def test_decoder_accepts_every_intact_frame_after_corrupt_ones(data, stream):
    items, pieces, damaged = stream
    wire = b"".join(pieces)
    decoder = BinaryDecoder()
    frames = feed_in_pieces(decoder, wire, split_points(data.draw, len(wire)))

    intact = [f for (_, f), bad in zip(items, damaged, strict=True) if not bad]
    # Damaged frames may fall apart into several chunks, or (a cut to nothing)
    # into none, but never decode to anything: exactly the intact ones come out.
    assert_same_frames(frames, intact)
    assert_counts_add_up(decoder, len(frames))


# --- The C header -----------------------------------------------------------------


def test_example_sender_matches_python_encoder(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    program = tmp_path / "example_sender"
    subprocess.run(
        [
            gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2",
            "-I", str(FIRMWARE_DIR), "-o", str(program),
            str(FIRMWARE_DIR / "example_sender.c"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    output = subprocess.run(
        [str(program)], check=True, capture_output=True, timeout=10
    ).stdout

    samples = np.array(
        [
            [0.01, -0.02, 0.98, 1.5, -0.25, 0.0],
            [0.03, -0.01, 1.02, 2.0, -0.5, 0.125],
            [-1.0e-3, 4.5, -9.81, 250.0, -1000.0, 3.0e38],
        ],
        np.float32,
    )
    expected = encode_reset(0, 0, sensor_time_ms=1000)
    for i, row in enumerate(samples):
        expected += encode_frame(0, i + 1, row, sensor_time_ms=1020 + 20 * i)
    expected += encode_frame(
        7, 65535, [1.5, -2.25, 1000.0], payload="int16", sensor_time_ms=2**32 - 1
    )
    assert output == expected

    decoder = BinaryDecoder()
    frames = decoder.feed(output)
    assert_same_frames(
        frames,
        [reset_frame(0, 0, 1000)]
        + [data_frame(0, i + 1, row, 1020 + 20 * i) for i, row in enumerate(samples)]
        + [data_frame(7, 65535, [1.5, -2.25, 1000.0], 2**32 - 1)],
    )
    assert not decoder.stats.rejected
