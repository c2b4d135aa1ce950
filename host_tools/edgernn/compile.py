"""Running Coral's ``edgetpu_compiler`` and reading what it reports.

The compiler is a closed-source x86-64 Linux binary from Coral's apt repository
(package ``edgetpu-compiler``); it cannot be installed from PyPI. This module runs it
when it is on PATH, and parses its summary in a pure function so the rules that
decide whether a compiled step model is acceptable can be tested without it.

The compiler's summary (stdout with ``-s``/``--show_operations``) looks like::

    Edge TPU Compiler version 16.0.384591198
    ...
    On-chip memory used for caching model parameters: 6.08MiB
    On-chip memory remaining for caching model parameters: 0.00B
    Off-chip memory used for streaming uncached model parameters: 1.70MiB
    Number of Edge TPU subgraphs: 1
    Total number of operations: 12
    ...
    Operator                       Count      Status

    FULLY_CONNECTED                3          Mapped to Edge TPU
    SOFTMAX                        1          More than one subgraph is not supported

(each row on one line; a row that is not mapped states the reason).

It also writes ``<stem>_edgetpu.tflite`` and the same operator table to
``<stem>_edgetpu.log`` in the output directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from edgernnd.errors import ManifestError, ModelError, RuntimeUnavailableError

logger = logging.getLogger(__name__)

COMPILER_NAME = "edgetpu_compiler"
MAPPED_STATUS = "Mapped to Edge TPU"

INSTALL_HINT = (
    "install the edgetpu-compiler package from Coral's apt repository (see "
    "https://coral.ai/docs/edgetpu/compiler/; it exists for x86-64 Debian/Ubuntu "
    "only), or compile on such a machine and copy the *_edgetpu.tflite back"
)

_VERSION_RE = re.compile(r"Edge TPU Compiler version\s+(\S+)")
_OPERATOR_HEADER_RE = re.compile(r"^\s*Operator\s+Count\s+Status\s*$")
_OPERATOR_ROW_RE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")
_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)$")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

# Summary line prefix -> CompilerReport field, and how to read its value.
_SUMMARY_FIELDS = {
    "Input model": ("input_model", str),
    "Input": ("input_model", str),  # The .log file's spelling.
    "Output model": ("output_model", str),
    "Output": ("output_model", str),
    "On-chip memory used for caching model parameters": (
        "on_chip_memory_bytes",
        "size",
    ),
    "On-chip memory remaining for caching model parameters": (
        "on_chip_memory_remaining_bytes",
        "size",
    ),
    "Off-chip memory used for streaming uncached model parameters": (
        "off_chip_memory_bytes",
        "size",
    ),
    "Number of Edge TPU subgraphs": ("edgetpu_subgraphs", int),
    "Total number of operations": ("total_operations", int),
    "Number of operations that will run on Edge TPU": ("operations_on_edgetpu", int),
    "Number of operations that will run on CPU": ("operations_on_cpu", int),
}


class OperatorStatus(NamedTuple):
    """One row of the compiler's operator table.

    Attributes:
        name: TFLite operator name, e.g. ``FULLY_CONNECTED``.
        count: How many operators of that name share this status.
        status: ``Mapped to Edge TPU``, or the compiler's reason for leaving them on
            the CPU (e.g. "Operation is otherwise supported, but not mapped due to
            some unspecified limitation", "More than one subgraph is not supported").
    """

    name: str
    count: int
    status: str

    @property
    def mapped(self) -> bool:
        """True when these operators run on the Edge TPU."""
        return self.status == MAPPED_STATUS


@dataclasses.dataclass
class CompilerReport:
    """What ``edgetpu_compiler`` said about one model; None where it said nothing.

    Attributes:
        compiler_version: e.g. ``16.0.384591198``.
        input_model: Input file name as printed.
        output_model: Output file name as printed.
        on_chip_memory_bytes: Edge TPU RAM used for caching parameters.
        on_chip_memory_remaining_bytes: Edge TPU RAM left for caching.
        off_chip_memory_bytes: Parameters streamed from host memory per inference.
        edgetpu_subgraphs: Number of Edge TPU subgraphs (custom ops) in the output.
        total_operations: Operators in the model.
        operations_on_edgetpu: Operators mapped to the Edge TPU (printed only when
            some stay on the CPU).
        operations_on_cpu: Operators left on the CPU (same).
        operators: The operator table, in the compiler's order.
        succeeded: The compiler said the model compiled.
    """

    compiler_version: str | None = None
    input_model: str | None = None
    output_model: str | None = None
    on_chip_memory_bytes: int | None = None
    on_chip_memory_remaining_bytes: int | None = None
    off_chip_memory_bytes: int | None = None
    edgetpu_subgraphs: int | None = None
    total_operations: int | None = None
    operations_on_edgetpu: int | None = None
    operations_on_cpu: int | None = None
    operators: list[OperatorStatus] = dataclasses.field(default_factory=list)
    succeeded: bool = False

    @property
    def ops_not_mapped(self) -> list[OperatorStatus]:
        """The operator table rows that stay on the CPU."""
        return [row for row in self.operators if not row.mapped]


@dataclasses.dataclass
class CompileResult:
    """The outcome of :func:`compile_model`.

    Attributes:
        output_path: The compiled ``<stem>_edgetpu.tflite``.
        log_path: The compiler's ``<stem>_edgetpu.log``, or None if it wrote none.
        report: The parsed summary (operator table from the log when stdout lacks it).
        output_text: The compiler's stdout followed by its stderr.
        elapsed_s: Wall time of the compiler run in seconds.
    """

    output_path: Path
    log_path: Path | None
    report: CompilerReport
    output_text: str
    elapsed_s: float


def find_compiler() -> str | None:
    """The path of ``edgetpu_compiler`` on PATH, or None."""
    return shutil.which(COMPILER_NAME)


def compiler_version(path: str) -> str:
    """Ask a compiler for its version.

    Args:
        path: The ``edgetpu_compiler`` executable.

    Returns:
        The version string, e.g. ``16.0.384591198``.

    Raises:
        RuntimeUnavailableError: The program cannot be run or prints no version.
    """
    try:
        done = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeUnavailableError(
            f"cannot run {path!r} --version: {error}; {INSTALL_HINT}"
        ) from error
    match = _VERSION_RE.search(done.stdout + "\n" + done.stderr)
    if match is None:
        raise RuntimeUnavailableError(
            f"{path!r} --version printed no 'Edge TPU Compiler version' line "
            f"(exit code {done.returncode}); is it Coral's edgetpu_compiler?"
        )
    return match.group(1)


def compile_model(
    tflite_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    timeout_s: float = 120,
    compiler: str | None = None,
) -> CompileResult:
    """Compile an int8 ``.tflite`` model for the Edge TPU.

    Runs ``edgetpu_compiler -s -o OUT_DIR MODEL`` and parses what it prints. The
    compiled file can still leave operators on the CPU: judge the report with
    :func:`check_compiled`.

    Args:
        tflite_path: The fully int8-quantized model.
        out_dir: Directory for ``<stem>_edgetpu.tflite`` and ``<stem>_edgetpu.log``;
            created if missing.
        timeout_s: Seconds to wait for the compiler before killing it.
        compiler: The compiler executable; default: ``edgetpu_compiler`` on PATH.

    Returns:
        The compiled file's path and the parsed report.

    Raises:
        RuntimeUnavailableError: No compiler on PATH (the message says how to get
            one), or it cannot be started.
        ManifestError: ``tflite_path`` does not exist.
        ModelError: The compiler failed, timed out, or wrote no output model.
    """
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeUnavailableError(
            f"{COMPILER_NAME} is not installed (not found on PATH); {INSTALL_HINT}"
        )
    model = Path(tflite_path)
    if not model.is_file():
        raise ManifestError(f"no such model file: {str(model)!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    command = [compiler, "-s", "-o", str(out), str(model)]
    logger.info("running %s", " ".join(command))
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise ModelError(
            f"{COMPILER_NAME} did not finish {model.name} within {timeout_s:g} s and "
            "was stopped; give a larger timeout_s or a smaller model"
        ) from error
    except OSError as error:
        raise RuntimeUnavailableError(
            f"cannot run {compiler!r}: {error.strerror or error}; {INSTALL_HINT}"
        ) from error
    elapsed_s = time.monotonic() - started

    text = done.stdout + ("\n" + done.stderr if done.stderr else "")
    report = parse_compiler_output(text)
    output_path = out / f"{model.stem}_edgetpu.tflite"
    log_path: Path | None = out / f"{model.stem}_edgetpu.log"
    if not log_path.is_file():
        log_path = None

    if done.returncode != 0 or not output_path.is_file():
        outcome = (
            f"exited with code {done.returncode}"
            if done.returncode != 0
            else f"wrote no {output_path.name}"
        )
        raise ModelError(
            f"{COMPILER_NAME} {outcome} on {model.name}: {_failure_reason(text)}"
        )

    if not report.operators and log_path is not None:
        logged = parse_compiler_output(log_path.read_text(errors="replace"))
        report.operators = logged.operators
        report.compiler_version = report.compiler_version or logged.compiler_version

    logger.info(
        "compiled %s in %.1f s: %s Edge TPU subgraphs, %d operator kinds not mapped",
        model.name,
        elapsed_s,
        report.edgetpu_subgraphs,
        len(report.ops_not_mapped),
    )
    return CompileResult(
        output_path=output_path,
        log_path=log_path,
        report=report,
        output_text=text,
        elapsed_s=elapsed_s,
    )


def parse_compiler_output(text: str) -> CompilerReport:
    """Parse the compiler's stdout summary or its ``.log`` file.

    Args:
        text: What the compiler printed or logged; unknown lines are skipped.

    Returns:
        The report; fields the text does not mention stay None (or empty).
    """
    report = CompilerReport()
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue

        if _OPERATOR_HEADER_RE.match(line):
            in_table = True
            continue
        if in_table:
            row = _OPERATOR_ROW_RE.match(line)
            if row:
                name, count, status = row.groups()
                report.operators.append(OperatorStatus(name, int(count), status))
                continue
            in_table = False  # The table has ended; read the line as usual.

        version = _VERSION_RE.search(line)
        if version:
            report.compiler_version = version.group(1)
        elif line.startswith("Model compiled successfully") or line.startswith(
            "Compilation succeeded"
        ):
            report.succeeded = True
        elif ":" in line:
            key, _, value = line.partition(":")
            field = _SUMMARY_FIELDS.get(key.strip())
            if field is not None:
                _set_summary_field(report, field, value.strip())
    return report


def check_compiled(report: CompilerReport, cell_ops: Iterable[str]) -> None:
    """Refuse a compiled step model whose recurrent cell does not run on the TPU.

    A step model pays one host-to-TPU round trip per Edge TPU subgraph per frame, and
    an unmapped cell operator puts the recurrent state on the CPU every step; both
    defeat the accelerator. Other operators (e.g. a float softmax at the end) may
    stay on the CPU.

    Args:
        report: The parsed compiler report.
        cell_ops: Operator names of the recurrent cell, e.g. {"FULLY_CONNECTED",
            "ADD", "TANH"}.

    Raises:
        ModelError: The report lacks a subgraph count, a cell operator is not mapped,
            or there is not exactly one Edge TPU subgraph.
    """
    cell = {name.upper() for name in cell_ops}
    reasons = []

    unmapped = [row for row in report.ops_not_mapped if row.name in cell]
    if unmapped:
        reasons.append(
            "recurrent cell operators not mapped to the Edge TPU: "
            + ", ".join(f"{row.name} x{row.count} ({row.status})" for row in unmapped)
        )

    subgraphs = report.edgetpu_subgraphs
    if subgraphs is None:
        reasons.append(
            "the compiler output has no 'Number of Edge TPU subgraphs' line, so the "
            "mapping cannot be verified"
        )
    elif subgraphs == 0:
        reasons.append("no Edge TPU subgraph: nothing runs on the Edge TPU")
    elif subgraphs > 1:
        reasons.append(
            f"{subgraphs} Edge TPU subgraphs: the model bounces between CPU and Edge "
            "TPU within one step"
        )

    if reasons:
        raise ModelError(
            "; ".join(reasons) + "; keep the step model to Edge TPU operations "
            "(edgernn.edgetpu_check.check_model lists the offending ones)"
        )


def _set_summary_field(report: CompilerReport, field: tuple, value: str) -> None:
    name, kind = field
    if kind == "size":
        parsed = _parse_size_bytes(value)
    elif kind is int:
        parsed = int(value) if value.isdigit() else None
    else:
        parsed = value or None
    if parsed is None:
        logger.warning("cannot read compiler summary value %r for %s", value, name)
        return
    setattr(report, name, parsed)


def _parse_size_bytes(value: str) -> int | None:
    match = _SIZE_RE.match(value.strip())
    if match is None or match.group(2) not in _SIZE_UNITS:
        return None
    return round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _failure_reason(text: str) -> str:
    """The compiler's most telling line about a failure, for a one-line error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        lowered = line.lower()
        if (
            lowered.startswith("error")
            or "invalid model" in lowered
            or "compilation failed" in lowered
            or "internal compiler error" in lowered
        ):
            return line
    return lines[-1] if lines else "it printed nothing"
