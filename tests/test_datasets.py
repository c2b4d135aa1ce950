"""Tests for edgernn.datasets: the shipped archive files, and malformed inputs."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from edgernn import datasets
from edgernn.datasets import (
    Dataset,
    concatenate,
    load_builtin,
    read_csv,
    read_dataset,
    read_ts,
    write_csv,
)
from edgernnd.errors import DataError

BASICMOTIONS_CLASSES = ("Standing", "Running", "Walking", "Badminton")


def write_text(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# A small valid multivariate file; tests break one line of it at a time.
TS_HEADER = """\
# a comment
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true up down
@data
"""


def tiny_ts(tmp_path, *cases: str, header: str = TS_HEADER):
    return write_text(tmp_path, "Tiny_TRAIN.ts", header + "\n".join(cases) + "\n")


# ----------------------------------------------------------------- shipped files


def test_load_builtin_basicmotions_matches_archive_description():
    train, test = load_builtin("basicmotions")

    for split in (train, test):
        assert split.name == "BasicMotions"
        assert len(split.sequences) == 40
        assert split.channels == 6
        assert {seq.shape for seq in split.sequences} == {(100, 6)}
        assert all(seq.dtype == np.float32 for seq in split.sequences)
        assert split.class_names == BASICMOTIONS_CLASSES
        assert np.bincount(split.label_indices()).tolist() == [10, 10, 10, 10]

    # First case of the training file, first value of each dimension.
    assert train.labels[0] == "Standing"
    np.testing.assert_allclose(
        train.sequences[0][0],
        [0.079106, 0.394032, 0.551444, 0.351565, 0.02397, 0.633883],
        rtol=1e-6,
    )


def test_load_builtin_pickupgesture_keeps_unequal_lengths():
    train, test = load_builtin("PickupGesture")

    for split in (train, test):
        assert split.name == "PickupGestureWiimoteZ"
        assert len(split.sequences) == 50
        assert split.channels == 1
        assert split.class_names == tuple(str(i) for i in range(1, 11))
        assert np.bincount(split.label_indices()).tolist() == [5] * 10
    lengths = [len(seq) for seq in train.sequences]
    assert (min(lengths), max(lengths)) == (29, 361)
    assert not any(np.isnan(seq).any() for seq in train.sequences)


def test_read_dataset_resolves_builtin_names_and_splits():
    train = read_dataset("basicmotions")
    test = read_dataset("BasicMotions:test")

    assert len(train.sequences) == len(test.sequences) == 40
    assert not np.array_equal(train.sequences[0], test.sequences[0])
    np.testing.assert_array_equal(
        read_dataset(datasets.DATA_DIR / "BasicMotions_TEST.ts").sequences[5],
        test.sequences[5],
    )
    with pytest.raises(DataError, match="unknown split 'validate'"):
        read_dataset("basicmotions:validate")


def test_read_dataset_unknown_name_lists_choices():
    with pytest.raises(DataError, match="basicmotions") as error:
        read_dataset("nosuchdata")
    assert "\n" not in str(error.value)


def test_load_builtin_unknown_name_raises():
    with pytest.raises(DataError, match="no built-in dataset 'walking'"):
        load_builtin("walking")


def test_builtin_data_has_credits_file():
    credits = (datasets.DATA_DIR / "CREDITS.md").read_text(encoding="utf-8")
    assert "UEA & UCR Time Series Classification Archive" in credits
    assert "BasicMotions" in credits and "PickupGestureWiimoteZ" in credits


# ---------------------------------------------------------------------- read_ts


def test_read_ts_parses_cases_labels_and_missing_values(tmp_path):
    path = tiny_ts(tmp_path, "1,2,3:4,5,6:up", "7,?,9:10,11,12.5:down")

    data = read_ts(path)

    assert data.name == "Tiny"
    assert data.labels == ["up", "down"]
    assert data.class_names == ("up", "down")
    assert data.channel_names == ("dim_0", "dim_1")
    np.testing.assert_array_equal(data.sequences[0], [[1, 4], [2, 5], [3, 6]])
    assert math.isnan(data.sequences[1][1, 0])
    assert data.sequences[1][2, 1] == np.float32(12.5)
    assert data.label_indices().tolist() == [0, 1]


def test_read_ts_unequal_length_univariate_without_labels(tmp_path):
    header = (
        "@problemName U\n@univariate true\n@equalLength false\n"
        "@classLabel false\n@data\n"
    )
    path = tiny_ts(tmp_path, "1,2,3,4", "5,6", header=header)

    data = read_ts(path)

    assert [seq.shape for seq in data.sequences] == [(4, 1), (2, 1)]
    assert data.labels == ["", ""]
    assert data.class_names == ()


def test_read_ts_without_dimensions_header_takes_first_case(tmp_path):
    header = "@equalLength false\n@classLabel true a b\n@data\n"
    good = tiny_ts(tmp_path, "1,2:3,4:a", "5:6:b", header=header)
    assert [seq.shape for seq in read_ts(good).sequences] == [(2, 2), (1, 2)]

    bad = tiny_ts(tmp_path, "1,2:3,4:a", "5:6:7:b", header=header)
    with pytest.raises(DataError, match=r"line 5: case has 3 dimensions but .* 2"):
        read_ts(bad)


# Each malformed case: (lines after the header, expected line number, message part).
# The header above is 10 lines long, so the first case is line 11.
MALFORMED_CASES = {
    "dimension_lengths_differ": (
        ["1,2,3:4,5:up"],
        11,
        "dimension 2 has 2 values, dimension 1 has 3; every dimension of a case "
        "must have the same length",
    ),
    "unknown_label": (["1,2,3:4,5,6:sideways"], 11, "class label 'sideways' is not"),
    "wrong_dimension_count": (["1,2,3:4,5,6:7,8,9:up"], 11, "case has 3 dimensions"),
    "not_a_number": (["1,2,3:4,x5,6:up"], 11, "dimension 2 value 2 is 'x5'"),
    "empty_value": (["1,2,3:4,5,6:up", "1,2,3,:4,5,6:up"], 12, "an empty value"),
    "unequal_length": (["1,2,3:4,5,6:up", "1,2:3,4:down"], 12, "@equalLength true"),
    "missing_label": (["1,2,3"], 11, "no class label"),
    "header_after_data": (["1,2,3:4,5,6:up", "@missing false"], 12, "after @data"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CASES))
def test_read_ts_malformed_case_names_file_and_line(tmp_path, case):
    lines, line_number, message = MALFORMED_CASES[case]
    path = tiny_ts(tmp_path, *lines)

    with pytest.raises(DataError) as error:
        read_ts(path)

    text = str(error.value)
    assert text.startswith(f"Tiny_TRAIN.ts line {line_number}: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("header_line", "line_number", "message"),
    [
        ("@timeStamps true", 1, "@timeStamps true is not supported"),
        ("@equalLength maybe", 1, "@equalLength needs true or false, got 'maybe'"),
        ("@dimensions two", 1, "@dimensions needs one positive integer"),
        ("@classLabel true", 1, "lists no classes"),
        ("@classLabel true a b a", 1, "lists a class twice"),
        ("1,2,3:4,5,6:up", 1, "data before the @data line"),
    ],
)
def test_read_ts_malformed_header_names_line(
    tmp_path, header_line, line_number, message
):
    path = tiny_ts(tmp_path, "1,2,3:4,5,6:up", header=header_line + "\n" + TS_HEADER)

    with pytest.raises(DataError, match=f"line {line_number}: .*{message}"):
        read_ts(path)


def test_read_ts_series_length_mismatch_names_line(tmp_path):
    header = TS_HEADER.replace("@seriesLength 3", "@seriesLength 4")
    path = tiny_ts(tmp_path, "1,2,3:4,5,6:up", header=header)

    with pytest.raises(DataError, match=r"line 11: .*@seriesLength is 4"):
        read_ts(path)


def test_read_ts_without_data_section_raises(tmp_path):
    path = write_text(tmp_path, "x.ts", "@problemName X\n1,2,3\n")
    with pytest.raises(DataError, match="line 2: data before the @data line"):
        read_ts(path)

    path = write_text(tmp_path, "y.ts", "@problemName Y\n")
    with pytest.raises(DataError, match="no @data line"):
        read_ts(path)

    path = write_text(tmp_path, "z.ts", "@problemName Z\n@data\n\n")
    with pytest.raises(DataError, match="no cases after @data"):
        read_ts(path)


def test_read_ts_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_ts(tmp_path / "absent.ts")


# --------------------------------------------------------------------- read_csv


def test_read_csv_groups_interleaved_streams_and_splits_on_label(tmp_path):
    path = write_text(
        tmp_path,
        "rec.csv",
        """
        stream,label,ax,ay
        0,walk,1,2
        1,run,3,4
        0,walk,5,6
        1,run,7,8
        0,stand,9,10
        """,
    )

    data = read_csv(path)

    assert data.labels == ["walk", "stand", "run"]
    assert data.class_names == ("run", "stand", "walk")
    assert data.channel_names == ("ax", "ay")
    np.testing.assert_array_equal(data.sequences[0], [[1, 2], [5, 6]])
    np.testing.assert_array_equal(data.sequences[1], [[9, 10]])
    np.testing.assert_array_equal(data.sequences[2], [[3, 4], [7, 8]])


def test_read_csv_without_stream_or_label_is_one_sequence(tmp_path):
    path = write_text(
        tmp_path,
        "plain.csv",
        """
        t_ms,note,x,y,z
        0,start,1,2,3
        10,,4,5,nan
        """,
    )

    data = read_csv(path, time_column="t_ms")

    assert data.labels == [""]
    assert data.class_names == ()
    assert data.channel_names == ("x", "y", "z")
    assert data.sequences[0].shape == (2, 3)
    assert math.isnan(data.sequences[0][1, 2])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stream,label,ax\n0,a,1\n0,a,oops\n", "line 3: column 'ax' is 'oops'"),
        ("stream,label,ax\n0,a,1\n0,a,\n", "line 3: column 'ax' is empty"),
        ("stream,label,ax\n0,a,1\n0,a\n", "line 3: 2 fields, the header has 3"),
        ("1,2,3\n4,5,6\n", "line 1: the first row holds the number '1'"),
        ("a,b,a\n1,2,3\n", "line 1: header names ['a'] more than once"),
        ("label,ax\n", "a header row but no frames"),
        ("\n\n", "the file is empty"),
        ("label,name\nx,y\n", "line 2: no numeric column"),
    ],
)
def test_read_csv_malformed_names_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(DataError) as error:
        read_csv(path)

    assert str(error.value).startswith("bad.csv")
    assert message in str(error.value)


def test_read_csv_named_time_column_must_exist(tmp_path):
    path = write_text(tmp_path, "r.csv", "label,ax\na,1\n")
    with pytest.raises(DataError, match="line 1: no time column 'time'"):
        read_csv(path, time_column="time")


def test_write_csv_round_trips_basicmotions_exactly(tmp_path):
    train, _ = load_builtin("basicmotions")
    train.sequences[3][7, 2] = np.nan
    path = tmp_path / "bm.csv"

    write_csv(train, path)
    back = read_csv(path)

    assert back.labels == train.labels
    assert set(back.class_names) == set(train.class_names)
    assert back.channel_names == train.channel_names
    assert len(back.sequences) == 40
    for original, copy in zip(train.sequences, back.sequences, strict=True):
        np.testing.assert_array_equal(original, copy)  # NaN == NaN here


def test_write_csv_unlabelled_omits_label_column(tmp_path):
    data = Dataset("u", [np.ones((2, 2), np.float32)], [""], ())
    path = tmp_path / "u.csv"

    write_csv(data, path)

    assert path.read_text().splitlines()[0] == "stream,ch0,ch1"
    assert read_csv(path).labels == [""]


# ---------------------------------------------------------- Dataset, concatenate


def test_concatenate_keeps_order_and_classes():
    train, test = load_builtin("basicmotions")

    both = concatenate([train, test])

    assert len(both.sequences) == 80
    assert both.class_names == BASICMOTIONS_CLASSES
    assert both.labels[40:] == test.labels
    assert both.name == "BasicMotions+BasicMotions"


def test_concatenate_rejects_different_channel_counts():
    motions, _ = load_builtin("basicmotions")
    gestures, _ = load_builtin("pickupgesture")

    with pytest.raises(DataError, match="different channel counts"):
        concatenate([motions, gestures])
    with pytest.raises(DataError, match="at least one"):
        concatenate([])


def test_dataset_validates_sequences_and_labels():
    good = np.zeros((3, 2), np.float32)
    with pytest.raises(DataError, match="2 labels for 1 sequences"):
        Dataset("d", [good], ["a", "b"], ("a", "b"))
    with pytest.raises(DataError, match="float64"):
        Dataset("d", [good.astype(np.float64)], ["a"], ("a",))
    with pytest.raises(DataError, match="different channel counts"):
        Dataset("d", [good, np.zeros((3, 4), np.float32)], ["a", "a"], ("a",))


def test_dataset_label_indices_rejects_unknown_label():
    data = Dataset("d", [np.zeros((1, 1), np.float32)] * 2, ["a", "c"], ("a", "b"))
    with pytest.raises(DataError, match="sequence 1 has label 'c'"):
        data.label_indices()
