"""Tests of the csv wire format: units on bytes and the fuzz suite.

The property tests run with fixed seeds (derandomize) and a bounded number of
examples so that CI time stays bounded and a failure reproduces everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgernnd.csv_codec import (
    CsvDecoder,
    encode_csv_line,
    encode_csv_reset,
    format_float32,
)
from edgernnd.frames import Frame, FrameKind

FUZZ = settings(
    derandomize=True,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def decode_all(data: bytes, channels: int = 3, **kwargs) -> tuple[list, CsvDecoder]:
    kwargs.setdefault("discard_first_line", False)
    decoder = CsvDecoder(channels, **kwargs)
    return decoder.feed(data), decoder


def summary(frames: list[Frame]) -> list[tuple]:
    return [(f.stream_id, f.kind, f.values.tolist()) for f in frames]


def assert_counts_add_up(decoder: CsvDecoder, returned: int) -> None:
    stats = decoder.stats
    assert stats.accepted == returned
    assert stats.frames_in == stats.accepted + sum(stats.rejected.values())
    assert set(stats.rejected) <= {
        "field_count", "not_a_number", "stream_id", "oversize", "partial_first_line",
    }
    assert set(stats.ignored) <= {"comment"}


# --- Units ------------------------------------------------------------------------


def test_decoder_reads_any_mix_of_separators():
    frames, decoder = decode_all(
        b"1,2,3\n4 5 6\r\n7\t8\t9\n 10,, 11\t ,12 ,\n-1e3,+2.5,.5\n"
    )
    assert summary(frames) == [
        (0, FrameKind.DATA, [1.0, 2.0, 3.0]),
        (0, FrameKind.DATA, [4.0, 5.0, 6.0]),
        (0, FrameKind.DATA, [7.0, 8.0, 9.0]),
        (0, FrameKind.DATA, [10.0, 11.0, 12.0]),
        (0, FrameKind.DATA, [-1000.0, 2.5, 0.5]),
    ]
    assert all(f.seq is None and f.sensor_time_ms is None for f in frames)
    assert all(f.values.dtype == np.float32 for f in frames)
    assert decoder.stats.accepted == 5 and not decoder.stats.rejected


def test_decoder_reads_stream_id_from_extra_field():
    frames, _ = decode_all(b"7,1,2,3\n0 4 5 6\n65535\t1\t1\t1\n")
    assert [f.stream_id for f in frames] == [7, 0, 65535]
    assert frames[0].values.tolist() == [1.0, 2.0, 3.0]


def test_decoder_resets_streams():
    frames, decoder = decode_all(
        b"#reset\n#reset 4\r\n#reset\t9\n#reset 65536\n#reset x\n#resetting\n"
    )
    assert summary(frames) == [
        (0, FrameKind.RESET, []),
        (4, FrameKind.RESET, []),
        (9, FrameKind.RESET, []),
    ]
    assert decoder.stats.rejected == {"stream_id": 2}
    assert decoder.stats.ignored == {"comment": 1}


def test_decoder_uses_configured_reset_line():
    frames, decoder = decode_all(b"RESET\nRESET 2\n#reset\n", reset_line="RESET")
    assert [(f.stream_id, f.kind) for f in frames] == [
        (0, FrameKind.RESET),
        (2, FrameKind.RESET),
    ]
    assert decoder.stats.ignored == {"comment": 1}


def test_decoder_counts_comments_and_skips_blank_lines():
    frames, decoder = decode_all(b"# header\n\n   \r\n\t\n#\n1,2,3\n")
    assert len(frames) == 1
    assert decoder.stats.ignored == {"comment": 2}
    assert decoder.stats.frames_in == 1


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"1,2\n", "field_count"),
        (b"1,2,3,4,5\n", "field_count"),
        (b",,,\n", "field_count"),
        (b"1,2,x\n", "not_a_number"),
        (b"1,2,3e\n", "not_a_number"),
        (b"1_0,2,3\n", "not_a_number"),
        (b"1,2,\xff\n", "not_a_number"),
        (b"-1,1,2,3\n", "stream_id"),
        (b"1.0,1,2,3\n", "stream_id"),
        (b"65536,1,2,3\n", "stream_id"),
        (b"1" * 1025 + b"\n", "oversize"),
    ],
)
def test_decoder_rejects_with_reason(line, reason):
    frames, decoder = decode_all(line + b"4,5,6\n")
    assert decoder.stats.rejected == {reason: 1}
    assert summary(frames) == [(0, FrameKind.DATA, [4.0, 5.0, 6.0])]


def test_decoder_passes_nan_and_inf_through():
    frames, _ = decode_all(b"nan,inf,-Infinity\n1e39,-1e39,1e-50\n")
    first, second = frames[0].values, frames[1].values
    assert np.isnan(first[0]) and first[1] == np.inf and first[2] == -np.inf
    assert second.tolist() == [np.inf, -np.inf, 0.0]


def test_decoder_waits_for_newline():
    decoder = CsvDecoder(3, discard_first_line=False)
    assert decoder.feed(b"1,2,3") == []
    assert decoder.feed(b"\r") == []
    assert summary(decoder.feed(b"\n")) == [(0, FrameKind.DATA, [1.0, 2.0, 3.0])]


def test_decoder_discards_first_partial_line():
    decoder = CsvDecoder(3)
    assert decoder.feed(b"5,6\n1,2") == []  # the tail of a line sent before opening
    assert len(decoder.feed(b",3\n")) == 1
    assert decoder.stats.rejected == {"partial_first_line": 1}
    assert decoder.stats.frames_in == 2


def test_decoder_discards_first_line_without_counting_blank_one():
    decoder = CsvDecoder(3)
    assert len(decoder.feed(b"\r\n1,2,3\n")) == 1
    assert decoder.stats.frames_in == 1 and not decoder.stats.rejected


def test_decoder_discards_long_first_line_with_bounded_memory():
    decoder = CsvDecoder(3, max_line_bytes=50)
    for _ in range(100):
        assert decoder.feed(b"9" * 1000) == []
        assert decoder.buffered_bytes == 0
    assert len(decoder.feed(b"\n1,2,3\n")) == 1
    assert decoder.stats.rejected == {"partial_first_line": 1}


def test_decoder_discards_oversize_line_without_newline():
    decoder = CsvDecoder(3, max_line_bytes=64, discard_first_line=False)
    for _ in range(1000):  # 100 kB, no newline ever
        assert decoder.feed(b"1," * 50) == []
        assert decoder.buffered_bytes <= 65
    assert decoder.stats.rejected == {"oversize": 1}
    frames = decoder.feed(b"1\n7,8,9\n")
    assert summary(frames) == [(0, FrameKind.DATA, [7.0, 8.0, 9.0])]
    assert decoder.stats.rejected == {"oversize": 1}
    assert decoder.stats.bytes_in == 100_000 + 8


def test_decoder_accepts_line_of_exactly_max_bytes():
    line = b"1,2," + b"0" * 60
    frames, decoder = decode_all(line + b"\r\n", max_line_bytes=len(line))
    assert len(frames) == 1 and not decoder.stats.rejected


def test_decoder_accepts_lines_split_at_every_position():
    text = b"1,2,3\r\n#reset 2\n# note\n4\t5 6\n2,7,8,9\n"
    expected = summary(decode_all(text)[0])
    assert len(expected) == 4
    for cut in range(len(text) + 1):
        decoder = CsvDecoder(3, discard_first_line=False)
        frames = decoder.feed(text[:cut]) + decoder.feed(text[cut:])
        assert summary(frames) == expected
        assert decoder.stats.ignored == {"comment": 1}


def test_decoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        CsvDecoder(0)
    with pytest.raises(ValueError, match="reset_line"):
        CsvDecoder(3, reset_line="a\nb")
    with pytest.raises(ValueError, match="max_line_bytes"):
        CsvDecoder(3, max_line_bytes=0)


def test_encode_csv_line_formats_shortest_float32():
    line = encode_csv_line([0.1, -2.5, 1e39, float("nan"), -0.0, 3.0e38])
    assert line == b"0.1,-2.5,inf,nan,-0.0,3e+38\n"
    assert encode_csv_line([1.0], stream_id=12) == b"12,1.0\n"


def test_encode_csv_line_rejects_bad_stream_id():
    with pytest.raises(ValueError, match="stream_id"):
        encode_csv_line([1.0], stream_id=65536)
    with pytest.raises(ValueError, match="shape"):
        encode_csv_line([[1.0]])


def test_encode_csv_reset_lines():
    assert encode_csv_reset() == b"#reset\n"
    assert encode_csv_reset("RESET", stream_id=3) == b"RESET 3\n"
    frames, _ = decode_all(encode_csv_reset(stream_id=3))
    assert summary(frames) == [(3, FrameKind.RESET, [])]


# --- Fuzz properties --------------------------------------------------------------


@FUZZ
@given(st.floats(width=32))
def test_format_float32_round_trips_exactly(value):
    single = np.float32(value)
    back = np.float32(float(format_float32(value)))
    assert back.tobytes() == single.tobytes() or (np.isnan(back) and np.isnan(single))


@st.composite
def csv_lines(draw, channels: int) -> tuple[bytes, tuple]:
    """A valid line (data or reset) and the summary it must decode to."""
    stream_id = draw(st.none() | st.integers(0, 65535))
    if draw(st.integers(0, 5)) == 0:
        return encode_csv_reset(stream_id=stream_id), (
            stream_id or 0,
            FrameKind.RESET,
            [],
        )
    values = draw(
        st.lists(
            st.floats(width=32, allow_nan=False), min_size=channels, max_size=channels
        )
    )
    line = encode_csv_line(values, stream_id)
    if draw(st.booleans()):
        line = line.replace(b",", draw(st.sampled_from([b" ", b"\t", b", ", b" ,\t"])))
    if draw(st.booleans()):
        line = line[:-1] + b"\r\n"
    return line, (stream_id or 0, FrameKind.DATA, values)


def split_points(draw, length: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, length), max_size=8))))


def feed_in_pieces(decoder: CsvDecoder, data: bytes, cuts: list[int]) -> list:
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        frames += decoder.feed(data[start:end])
        assert decoder.buffered_bytes <= decoder.max_line_bytes + 1
    return frames


def is_comment(line: bytes) -> bool:
    """A '#' line that is not the default reset line, with or without an id."""
    is_reset = line == b"#reset" or line[:7] in (b"#reset ", b"#reset\t", b"#reset,")
    return line.startswith(b"#") and not is_reset


def count_lines(data: bytes, max_line_bytes: int) -> tuple[int, int]:
    """(frames_in, comments) that a decoder dropping the first line must count."""
    lines = data.split(b"\n")
    tail = lines.pop()
    if not lines:
        return 0, 0  # still inside the first line
    frames_in = int(bool(lines.pop(0).strip()))  # partial_first_line
    comments = 0
    for line in lines:
        line = line.removesuffix(b"\r")
        if len(line) > max_line_bytes:
            frames_in += 1
        elif is_comment(line):
            comments += 1
        elif line.strip():
            frames_in += 1
    limit = max_line_bytes + tail.endswith(b"\r")
    return frames_in + (len(tail) > limit), comments


@FUZZ
@given(
    st.data(),
    st.lists(
        st.sampled_from([b"\n", b"\r", b",", b" ", b"#", b"1", b"-", b"e", b"x"])
        | st.binary(min_size=1, max_size=20),
        max_size=200,
    ).map(b"".join),
    st.integers(1, 40),
)
def test_decoder_survives_random_bytes(data, text, max_line_bytes):
    decoder = CsvDecoder(2, max_line_bytes=max_line_bytes)
    frames = feed_in_pieces(decoder, text, split_points(data.draw, len(text)))
    assert decoder.stats.bytes_in == len(text)
    assert_counts_add_up(decoder, len(frames))
    frames_in, comments = count_lines(text, max_line_bytes)
    assert decoder.stats.frames_in == frames_in
    assert decoder.stats.ignored["comment"] == comments


@FUZZ
@given(st.data(), st.integers(1, 8))
def test_decoder_returns_valid_lines_however_split(data, channels):
    items = data.draw(st.lists(csv_lines(channels), max_size=12))
    text = b"".join(line for line, _ in items)
    decoder = CsvDecoder(channels, discard_first_line=False)
    frames = feed_in_pieces(decoder, text, split_points(data.draw, len(text)))
    assert summary(frames) == [want for _, want in items]
    assert not decoder.stats.rejected


@FUZZ
@given(st.data(), st.integers(1, 6))
def test_decoder_passes_duplicated_and_reordered_lines(data, channels):
    items = data.draw(st.lists(csv_lines(channels), min_size=1, max_size=6))
    order = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=15))
    frames, _ = decode_all(b"".join(items[i][0] for i in order), channels)
    assert summary(frames) == [items[i][1] for i in order]


@FUZZ
@given(st.data(), st.integers(1, 6))
def test_decoder_accepts_every_valid_line_after_corrupt_ones(data, channels):
    valid, broken = [], 0
    pieces = []
    for _ in range(data.draw(st.integers(1, 10))):
        if data.draw(st.booleans()):
            line, want = data.draw(csv_lines(channels))
            pieces.append(line)
            valid.append(want)
        else:
            # Starts with a letter, so it can be neither numbers nor a comment.
            junk = data.draw(st.binary(max_size=600)).replace(b"\n", b"")
            pieces.append(b"z" + junk + b"\n")
            broken += 1
    text = b"".join(pieces)
    # Valid lines are under 300 bytes; some junk lines are over the limit.
    decoder = CsvDecoder(channels, max_line_bytes=400, discard_first_line=False)
    frames = feed_in_pieces(decoder, text, split_points(data.draw, len(text)))
    assert summary(frames) == valid
    assert sum(decoder.stats.rejected.values()) == broken
    assert_counts_add_up(decoder, len(frames))
