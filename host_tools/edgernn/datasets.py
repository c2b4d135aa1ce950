"""Readers and a writer for labelled sensor recordings.

Two formats are read into the same :class:`Dataset`:

* UEA/UCR ``.ts`` files (the Time Series Classification Archive's format), equal or
  unequal length, univariate or multivariate, with ``?`` for missing values.
* ``.csv`` files with a header row and one frame per row, optionally with a label
  column and a stream id column (the form the daemon's replay tool sends).

Two archive datasets ship with edgernn in ``host_tools/edgernn/data`` (see its
``CREDITS.md``) and are reachable by name: ``basicmotions`` and ``pickupgesture``.

Every malformed input raises :class:`edgernnd.errors.DataError` with one line naming
the file, the line number, the problem and how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from edgernnd.errors import DataError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"

# Built-in name -> (train file, test file), both in DATA_DIR.
BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "basicmotions": ("BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts"),
    "pickupgesture": (
        "PickupGestureWiimoteZ_TRAIN.ts",
        "PickupGestureWiimoteZ_TEST.ts",
    ),
}

_TS_BOOLEAN_TAGS = ("timestamps", "missing", "univariate", "equallength")


@dataclasses.dataclass
class Dataset:
    """A set of recordings, each a sequence of frames, with one label each.

    Attributes:
        name: Short name (the .ts file's @problemName or the file's stem).
        sequences: One array per recording, float32, shape (frames, channels);
            frame counts may differ, channel counts may not. Missing values are NaN.
        labels: One class label per sequence; empty strings when unlabelled.
        class_names: The classes in their canonical order: the .ts file's
            @classLabel list, else the sorted unique non-empty labels.
        channel_names: One name per channel (csv header names; ``dim_0``... for .ts).
            May be empty, in which case writers invent ``ch0``, ``ch1``...
    """

    name: str
    sequences: list[np.ndarray]
    labels: list[str]
    class_names: tuple[str, ...]
    channel_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.sequences):
            raise DataError(
                f"dataset {self.name!r}: {len(self.labels)} labels for "
                f"{len(self.sequences)} sequences; give one label per sequence"
            )
        widths = set()
        for index, seq in enumerate(self.sequences):
            if not isinstance(seq, np.ndarray) or seq.ndim != 2:
                raise DataError(
                    f"dataset {self.name!r}: sequence {index} must be a 2-D array "
                    f"(frames, channels), got {getattr(seq, 'shape', type(seq))!r}"
                )
            if seq.dtype != np.float32:
                raise DataError(
                    f"dataset {self.name!r}: sequence {index} has dtype {seq.dtype}; "
                    "convert it with .astype(np.float32)"
                )
            widths.add(seq.shape[1])
        if len(widths) > 1:
            raise DataError(
                f"dataset {self.name!r}: sequences have different channel counts "
                f"{sorted(widths)}; every sequence needs the same channels"
            )
        if self.channel_names and widths and len(self.channel_names) not in widths:
            raise DataError(
                f"dataset {self.name!r}: {len(self.channel_names)} channel names for "
                f"{widths.pop()} channels"
            )

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def channels(self) -> int:
        """Number of channels per frame (0 for a dataset without sequences)."""
        if self.sequences:
            return int(self.sequences[0].shape[1])
        return len(self.channel_names)

    def label_indices(self) -> np.ndarray:
        """The labels as indices into :attr:`class_names`.

        Returns:
            int64 array, shape (sequences,).

        Raises:
            DataError: A label is empty or not one of ``class_names``.
        """
        lookup = {name: i for i, name in enumerate(self.class_names)}
        indices = np.empty(len(self.labels), dtype=np.int64)
        for i, label in enumerate(self.labels):
            if label not in lookup:
                raise DataError(
                    f"dataset {self.name!r}: sequence {i} has label {label!r}, which "
                    f"is not one of the classes {list(self.class_names)!r}"
                )
            indices[i] = lookup[label]
        return indices


# --------------------------------------------------------------------------- .ts


@dataclasses.dataclass
class _TsHeader:
    problem_name: str | None = None
    timestamps: bool | None = None
    missing: bool | None = None
    univariate: bool | None = None
    dimensions: int | None = None
    equal_length: bool | None = None
    series_length: int | None = None
    has_labels: bool = False
    class_labels: tuple[str, ...] = ()


def read_ts(path: str | Path) -> Dataset:
    """Read a UEA/UCR ``.ts`` time series classification file.

    Header lines start with ``@`` (problemName, timeStamps, missing, univariate,
    dimensions, equalLength, seriesLength, classLabel, data); ``#`` lines are
    comments. Each data line is one case: its dimensions separated by ``:``, each a
    comma-separated series, then the class label when ``@classLabel true``.

    Args:
        path: The .ts file.

    Returns:
        The cases as a :class:`Dataset`; each sequence float32, shape
        (series length, dimensions), ``?`` read as NaN. Unequal-length files keep
        each case's own length.

    Raises:
        DataError: The file is missing, uses timestamps, or is malformed; the message
            names the line.
    """
    path = Path(path)
    lines = _read_lines(path)
    where = path.name

    header = _TsHeader()
    sequences: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    saw_missing_value = False

    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if in_data:
                raise DataError(
                    f"{where} line {number}: header line {line.split()[0]!r} after "
                    "@data; move every @ line above @data"
                )
            in_data = _parse_ts_tag(line, header, where, number)
            continue
        if not in_data:
            raise DataError(
                f"{where} line {number}: data before the @data line; a .ts file "
                "needs its @ header lines and then @data before the cases"
            )
        values, label, had_missing = _parse_ts_case(line, header, where, number)
        saw_missing_value |= had_missing
        if header.equal_length and sequences and len(values) != len(sequences[0]):
            raise DataError(
                f"{where} line {number}: case has {len(values)} values per dimension, "
                f"earlier cases have {len(sequences[0])}, but the header says "
                "@equalLength true; fix the case or set @equalLength false"
            )
        if (
            header.equal_length
            and header.series_length is not None
            and len(values) != header.series_length
        ):
            raise DataError(
                f"{where} line {number}: case has {len(values)} values per dimension "
                f"but @seriesLength is {header.series_length}; fix the case or the "
                "header"
            )
        sequences.append(values)
        labels.append(label)

    if not in_data:
        raise DataError(
            f"{where}: no @data line; is this a UEA/UCR .ts file? The cases must "
            "follow a line reading @data"
        )
    if not sequences:
        raise DataError(f"{where}: no cases after @data; the file holds no data")
    if saw_missing_value and header.missing is False:
        logger.warning(
            "%s has '?' values although its header says @missing false", where
        )

    dims = sequences[0].shape[1]
    return Dataset(
        name=header.problem_name or path.stem,
        sequences=sequences,
        labels=labels,
        class_names=header.class_labels or _sorted_classes(labels),
        channel_names=tuple(f"dim_{i}" for i in range(dims)),
    )


def _parse_ts_tag(line: str, header: _TsHeader, where: str, number: int) -> bool:
    """Apply one @ line to ``header``; returns True when the line is @data."""
    parts = line.split()
    tag = parts[0][1:].lower()
    args = parts[1:]

    if tag == "data":
        return True
    if tag == "problemname":
        header.problem_name = " ".join(args) or None
    elif tag in _TS_BOOLEAN_TAGS:
        value = _parse_ts_bool(args, where, number, parts[0])
        if tag == "timestamps":
            if value:
                raise DataError(
                    f"{where} line {number}: @timeStamps true is not supported; "
                    "convert the file to plain equally spaced values (@timeStamps "
                    "false)"
                )
            header.timestamps = value
        elif tag == "missing":
            header.missing = value
        elif tag == "univariate":
            header.univariate = value
            if value:
                header.dimensions = header.dimensions or 1
        else:
            header.equal_length = value
    elif tag in ("dimensions", "serieslength"):
        if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
            raise DataError(
                f"{where} line {number}: {parts[0]} needs one positive integer, got "
                f"{' '.join(args)!r}"
            )
        if tag == "dimensions":
            header.dimensions = int(args[0])
        else:
            header.series_length = int(args[0])
    elif tag == "classlabel":
        if not args:
            raise DataError(
                f"{where} line {number}: @classLabel needs true or false, e.g. "
                "'@classLabel true walk run'"
            )
        header.has_labels = _parse_ts_bool(args[:1], where, number, parts[0])
        if header.has_labels:
            if len(args) < 2:
                raise DataError(
                    f"{where} line {number}: @classLabel true lists no classes; "
                    "name them after true, e.g. '@classLabel true walk run'"
                )
            if len(set(args[1:])) != len(args) - 1:
                raise DataError(
                    f"{where} line {number}: @classLabel lists a class twice: "
                    f"{args[1:]!r}"
                )
            header.class_labels = tuple(args[1:])
    elif tag == "targetlabel" and args[:1] and args[0].lower() == "true":
        raise DataError(
            f"{where} line {number}: @targetLabel true (regression) is not supported; "
            "edgernn reads classification files with @classLabel"
        )
    else:
        logger.warning(
            "%s line %d: ignoring unknown header %s", where, number, parts[0]
        )
    return False


def _parse_ts_bool(args: list[str], where: str, number: int, tag: str) -> bool:
    if len(args) == 1 and args[0].lower() in ("true", "false"):
        return args[0].lower() == "true"
    raise DataError(
        f"{where} line {number}: {tag} needs true or false, got {' '.join(args)!r}"
    )


def _parse_ts_case(
    line: str, header: _TsHeader, where: str, number: int
) -> tuple[np.ndarray, str, bool]:
    """Parse one data line into (float32 (length, dims) array, label, had '?')."""
    fields = line.split(":")
    label = ""
    if header.has_labels:
        if len(fields) < 2:
            raise DataError(
                f"{where} line {number}: no class label; with @classLabel true each "
                "case ends with ':' and its label"
            )
        label = fields.pop().strip()
        if label not in header.class_labels:
            raise DataError(
                f"{where} line {number}: class label {label!r} is not in @classLabel "
                f"{list(header.class_labels)!r}; add it to the header or fix the case"
            )

    if header.dimensions is not None and len(fields) != header.dimensions:
        raise DataError(
            f"{where} line {number}: case has {len(fields)} dimensions but the header "
            f"says {header.dimensions}; separate dimensions with ':'"
            + (" and end the case with ':label'" if header.has_labels else "")
        )
    if header.dimensions is None:
        # No @dimensions line: the first case decides, the others must agree.
        header.dimensions = len(fields)

    series = []
    had_missing = False
    for dim, field in enumerate(fields, start=1):
        values, missing = _parse_ts_series(field, where, number, dim)
        had_missing |= missing
        if series and len(values) != len(series[0]):
            raise DataError(
                f"{where} line {number}: dimension {dim} has {len(values)} values, "
                f"dimension 1 has {len(series[0])}; every dimension of a case must "
                "have the same length"
            )
        series.append(values)
    return np.stack(series, axis=1).astype(np.float32), label, had_missing


def _parse_ts_series(
    field: str, where: str, number: int, dim: int
) -> tuple[np.ndarray, bool]:
    tokens = [token.strip() for token in field.split(",")]
    missing = "?" in tokens
    if missing:
        tokens = ["nan" if token == "?" else token for token in tokens]
    try:
        return np.asarray(tokens, dtype=np.float64), missing
    except ValueError:
        pass

    # Slow path only to name the offending value.
    for position, token in enumerate(tokens, start=1):
        try:
            float(token)
        except ValueError:
            what = "an empty value" if not token else f"{token!r}, not a number"
            raise DataError(
                f"{where} line {number}: dimension {dim} value {position} is {what}; "
                "write numbers separated by ',' and '?' for a missing value"
            ) from None
    raise AssertionError("unreachable: numpy rejected values that float() accepts")


# --------------------------------------------------------------------------- .csv


def read_csv(
    path: str | Path,
    label_column: str | None = "label",
    stream_column: str | None = "stream",
    time_column: str | None = None,
) -> Dataset:
    """Read frames from a csv file with a header row, one frame per row.

    Columns named ``label_column``, ``stream_column`` and ``time_column`` are used
    when present (the first two are optional; a ``time_column`` that is named must
    exist) and are not channels. Of the other columns, those whose first data row
    holds a number are the channels, in file order; the rest are ignored (and
    logged). Rows are grouped by stream id, keeping file order within a stream, and
    each stream's rows are cut into a new sequence wherever its label changes.
    Without a stream column all rows belong to one stream.

    Args:
        path: The csv file.
        label_column: Name of the label column, or None for unlabelled data.
        stream_column: Name of the stream id column, or None.
        time_column: Name of a timestamp column to leave out of the channels.

    Returns:
        A :class:`Dataset`; sequences float32, shape (frames, channels); a value
        ``nan`` is read as NaN. ``class_names`` are the sorted unique labels.

    Raises:
        DataError: The file is missing, has no header or no rows, a named time column
            is absent, or a channel value is not a number; the message names the line.
    """
    path = Path(path)
    where = path.name
    rows = list(csv.reader(_read_lines(path)))
    # csv.reader on a list of lines keeps line numbers equal to list positions
    # as long as no field holds a quoted newline, which sensor logs do not.

    header_index = next(
        (i for i, row in enumerate(rows) if any(c.strip() for c in row)), None
    )
    if header_index is None:
        raise DataError(f"{where}: the file is empty; it needs a header row and frames")
    header = [name.strip() for name in rows[header_index]]
    _check_csv_header(header, where, header_index + 1)

    label_at = _column_index(header, label_column)
    stream_at = _column_index(header, stream_column)
    time_at = _column_index(header, time_column)
    if time_column is not None and time_at is None:
        raise DataError(
            f"{where} line {header_index + 1}: no time column {time_column!r} in the "
            f"header {header!r}; name an existing column or pass none"
        )
    special = {i for i in (label_at, stream_at, time_at) if i is not None}

    data = [
        (number, row)
        for number, row in enumerate(rows[header_index + 1 :], start=header_index + 2)
        if any(cell.strip() for cell in row)
    ]
    if not data:
        raise DataError(f"{where}: a header row but no frames below it")

    first_number, first_row = data[0]
    channel_at = [
        i
        for i, name in enumerate(header)
        if i not in special and i < len(first_row) and _is_number(first_row[i])
    ]
    ignored = [
        header[i]
        for i in range(len(header))
        if i not in special and i not in channel_at
    ]
    if ignored:
        logger.info("%s: ignoring non-numeric columns %s", where, ignored)
    if not channel_at:
        raise DataError(
            f"{where} line {first_number}: no numeric column to use as a channel; "
            f"header is {header!r}"
        )

    # stream id -> list of (label, frame) in file order; dicts keep first appearance.
    streams: dict[str, list[tuple[str, list[float]]]] = {}
    for number, row in data:
        if len(row) != len(header):
            raise DataError(
                f"{where} line {number}: {len(row)} fields, the header has "
                f"{len(header)}; every row needs one value per column"
            )
        frame = []
        for i in channel_at:
            cell = row[i].strip()
            try:
                frame.append(float(cell))
            except ValueError:
                what = "empty" if not cell else f"{cell!r}, not a number"
                raise DataError(
                    f"{where} line {number}: column {header[i]!r} is {what}; write "
                    "a number, or nan for a missing value"
                ) from None
        stream = row[stream_at].strip() if stream_at is not None else ""
        label = row[label_at].strip() if label_at is not None else ""
        streams.setdefault(stream, []).append((label, frame))

    sequences: list[np.ndarray] = []
    labels: list[str] = []
    for frames in streams.values():
        start = 0
        for end in range(1, len(frames) + 1):
            if end == len(frames) or frames[end][0] != frames[start][0]:
                block = [frame for _, frame in frames[start:end]]
                sequences.append(np.asarray(block, dtype=np.float32))
                labels.append(frames[start][0])
                start = end

    return Dataset(
        name=path.stem,
        sequences=sequences,
        labels=labels,
        class_names=_sorted_classes(labels),
        channel_names=tuple(header[i] for i in channel_at),
    )


def _check_csv_header(header: list[str], where: str, number: int) -> None:
    for i, name in enumerate(header):
        if not name:
            raise DataError(
                f"{where} line {number}: column {i + 1} of the header has no name; "
                "the first row must name every column"
            )
        if _is_number(name):
            raise DataError(
                f"{where} line {number}: the first row holds the number {name!r}; "
                "add a header row naming the columns"
            )
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(
            f"{where} line {number}: header names {duplicates!r} more than once; "
            "give every column its own name"
        )


def _column_index(header: list[str], name: str | None) -> int | None:
    if name is None or name not in header:
        return None
    return header.index(name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_csv(dataset: Dataset, path: str | Path) -> None:
    """Write a dataset in the form :func:`read_csv` reads back.

    Columns: ``stream`` (the sequence's index), ``label`` (left out when every label
    is empty), then one column per channel. Values are written with 9 significant
    digits, enough to read every float32 back exactly; NaN is written ``nan``.
    ``class_names`` order is not stored: reading back gives the sorted labels.

    Args:
        dataset: The data to write.
        path: Output file; overwritten.
    """
    names = dataset.channel_names or tuple(f"ch{i}" for i in range(dataset.channels))
    with_labels = any(dataset.labels)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stream", *(["label"] if with_labels else []), *names])
        for index, (seq, label) in enumerate(
            zip(dataset.sequences, dataset.labels, strict=True)
        ):
            lead = [str(index), *([label] if with_labels else [])]
            for frame in seq:
                writer.writerow([*lead, *(format(float(v), ".9g") for v in frame)])


# --------------------------------------------------------------------- any format


def read_dataset(path_or_name: str | Path) -> Dataset:
    """Read a recording file by its suffix, or a built-in dataset by name.

    Args:
        path_or_name: A ``.ts`` or ``.csv`` path, or a built-in name from
            :data:`BUILTIN_DATASETS` (``basicmotions``, ``pickupgesture``), which
            gives its training split; ``NAME:train`` and ``NAME:test`` choose the
            split explicitly.

    Returns:
        The dataset (csv files read with the default column names).

    Raises:
        DataError: Unknown suffix or name, missing file, or malformed content.
    """
    text = str(path_or_name)
    name, _, split = text.lower().partition(":")
    if name in BUILTIN_DATASETS and not Path(text).exists():
        train, test = load_builtin(name)
        if split in ("", "train"):
            return train
        if split == "test":
            return test
        raise DataError(
            f"unknown split {split!r} of {name!r}; use {name}:train or {name}:test"
        )

    path = Path(path_or_name)
    suffix = path.suffix.lower()
    if suffix == ".ts":
        return read_ts(path)
    if suffix == ".csv":
        return read_csv(path)
    raise DataError(
        f"cannot tell the format of {text!r}: give a .ts or .csv file, or one of the "
        f"built-in datasets {sorted(BUILTIN_DATASETS)!r}"
    )


def load_builtin(name: str) -> tuple[Dataset, Dataset]:
    """Load a dataset shipped with edgernn.

    Args:
        name: ``basicmotions`` or ``pickupgesture`` (case-insensitive).

    Returns:
        (train, test) as published in the UEA & UCR archive.

    Raises:
        DataError: Unknown name, or the shipped files are missing.
    """
    key = name.lower()
    if key not in BUILTIN_DATASETS:
        raise DataError(
            f"no built-in dataset {name!r}; choose one of {sorted(BUILTIN_DATASETS)!r}"
        )
    train_file, test_file = BUILTIN_DATASETS[key]
    return read_ts(DATA_DIR / train_file), read_ts(DATA_DIR / test_file)


def concatenate(datasets: Iterable[Dataset]) -> Dataset:
    """Join datasets with the same channels into one.

    Args:
        datasets: One or more datasets; sequences are kept in order.

    Returns:
        A dataset named after its parts joined by ``+``. Its ``class_names`` are the
        first dataset's, followed by classes the others add, in order of appearance.

    Raises:
        DataError: No datasets, or their channel counts differ.
    """
    parts = list(datasets)
    if not parts:
        raise DataError("concatenate() needs at least one dataset")
    widths = {part.channels for part in parts if part.sequences}
    if len(widths) > 1:
        raise DataError(
            "cannot concatenate datasets with different channel counts: "
            + ", ".join(f"{part.name}={part.channels}" for part in parts)
        )

    class_names: list[str] = []
    for part in parts:
        extra = part.class_names or _sorted_classes(part.labels)
        class_names.extend(c for c in extra if c not in class_names)
    return Dataset(
        name="+".join(part.name for part in parts),
        sequences=[seq for part in parts for seq in part.sequences],
        labels=[label for part in parts for label in part.labels],
        class_names=tuple(class_names),
        channel_names=next((p.channel_names for p in parts if p.channel_names), ()),
    )


def _sorted_classes(labels: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({label for label in labels if label}))


def _read_lines(path: Path) -> list[str]:
    """The file's lines without line endings; comments may hold any UTF-8."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"no such file: {str(path)!r}; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{str(path)!r} is a directory, not a recording file") from None
    except OSError as error:
        raise DataError(f"cannot read {str(path)!r}: {error.strerror}") from error
