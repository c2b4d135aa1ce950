"""Tests for edgernn.compile.

The report texts below follow the format Coral's edgetpu_compiler prints with
``-s``/``--show_operations`` (summary lines, then an ``Operator Count Status``
table) and writes to its ``*_edgetpu.log``. The real compiler cannot be installed
here (x86-64 Debian package from Coral's own apt repository), so the subprocess
tests run a MOCK ``edgetpu_compiler`` script put first on a temporary PATH.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from edgernn.compile import (
    CompilerReport,
    OperatorStatus,
    check_compiled,
    compile_model,
    compiler_version,
    find_compiler,
    parse_compiler_output,
)
from edgernnd.errors import ManifestError, ModelError, RuntimeUnavailableError

CELL_OPS = {"FULLY_CONNECTED", "ADD", "TANH"}
UNSUPPORTED_TYPE = "Operation is working on an unsupported data type"
UNSPECIFIED = (
    "Operation is otherwise supported, but not mapped due to some unspecified "
    "limitation"
)

REPORT_ALL_MAPPED = """\
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 24 ms.

Input model: step_int8.tflite
Input size: 3.05KiB
Output model: step_int8_edgetpu.tflite
Output size: 25.41KiB
On-chip memory used for caching model parameters: 2.75KiB
On-chip memory remaining for caching model parameters: 7.99MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 7
Operation log: step_int8_edgetpu.log

Operator                       Count      Status

FULLY_CONNECTED                3          Mapped to Edge TPU
ADD                            2          Mapped to Edge TPU
TANH                           1          Mapped to Edge TPU
SOFTMAX                        1          Mapped to Edge TPU
Compilation child process completed within timeout period.
Compilation succeeded!
"""

# The head maps, the float output conversion and softmax stay on the CPU.
REPORT_SOME_ON_CPU = f"""\
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 31 ms.

Input model: step_float_io.tflite
Input size: 3.41KiB
Output model: step_float_io_edgetpu.tflite
Output size: 25.90KiB
On-chip memory used for caching model parameters: 2.75KiB
On-chip memory remaining for caching model parameters: 7.99MiB
Off-chip memory used for streaming uncached model parameters: 1.50KiB
Number of Edge TPU subgraphs: 1
Total number of operations: 11
Operation log: step_float_io_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. \
A percentage of the model will instead run on the CPU, which is slower. If possible, \
consider updating your model to use only operations supported by the Edge TPU. For \
details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 8
Number of operations that will run on CPU: 3

Operator                       Count      Status

QUANTIZE                       2          Mapped to Edge TPU
FULLY_CONNECTED                3          Mapped to Edge TPU
ADD                            2          Mapped to Edge TPU
TANH                           1          Mapped to Edge TPU
SOFTMAX                        1          {UNSPECIFIED}
DEQUANTIZE                     2          {UNSUPPORTED_TYPE}
Compilation child process completed within timeout period.
Compilation succeeded!
"""

# The cell's TANH falls off the Edge TPU and splits the model in two.
REPORT_CELL_ON_CPU = f"""\
Edge TPU Compiler version 15.0.340273435

Model compiled successfully in 40 ms.

Input model: gru_step.tflite
Input size: 9.12KiB
Output model: gru_step_edgetpu.tflite
Output size: 30.02KiB
On-chip memory used for caching model parameters: 8.25KiB
On-chip memory remaining for caching model parameters: 7.98MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 2
Total number of operations: 14
Operation log: gru_step_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. \
A percentage of the model will instead run on the CPU, which is slower.
Number of operations that will run on Edge TPU: 12
Number of operations that will run on CPU: 2

Operator                       Count      Status

FULLY_CONNECTED                6          Mapped to Edge TPU
LOGISTIC                       2          Mapped to Edge TPU
MUL                            3          Mapped to Edge TPU
ADD                            1          Mapped to Edge TPU
TANH                           1          {UNSPECIFIED}
SUB                            1          More than one subgraph is not supported
"""

# What the compiler writes to <stem>_edgetpu.log.
LOG_FILE_TEXT = f"""\
Edge TPU Compiler version 16.0.384591198
Input: step_int8.tflite
Output: step_int8_edgetpu.tflite

Operator                       Count      Status

FULLY_CONNECTED                3          Mapped to Edge TPU
ADD                            2          Mapped to Edge TPU
TANH                           1          Mapped to Edge TPU
SOFTMAX                        1          {UNSPECIFIED}
"""

# Summary without the operator table (the compiler run without -s).
SUMMARY_ONLY = REPORT_ALL_MAPPED.split("Operator  ")[0]

FAILURE_OUTPUT = """\
Edge TPU Compiler version 16.0.384591198
ERROR: Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'. An older \
version of this builtin might be supported. Are you using an old TFLite binary with a \
newer model?

ERROR: Registration failed.

Invalid model: step_int8.tflite
Model could not be parsed
"""


# ------------------------------------------------------------------ parsing


def test_parse_compiler_output_all_mapped_report():
    report = parse_compiler_output(REPORT_ALL_MAPPED)

    assert report.compiler_version == "16.0.384591198"
    assert report.succeeded is True
    assert report.input_model == "step_int8.tflite"
    assert report.output_model == "step_int8_edgetpu.tflite"
    assert report.on_chip_memory_bytes == 2816  # 2.75 KiB
    assert report.on_chip_memory_remaining_bytes == round(7.99 * 1024**2)
    assert report.off_chip_memory_bytes == 0
    assert report.edgetpu_subgraphs == 1
    assert report.total_operations == 7
    assert report.operations_on_cpu is None  # printed only when some stay behind
    assert report.operators == [
        OperatorStatus("FULLY_CONNECTED", 3, "Mapped to Edge TPU"),
        OperatorStatus("ADD", 2, "Mapped to Edge TPU"),
        OperatorStatus("TANH", 1, "Mapped to Edge TPU"),
        OperatorStatus("SOFTMAX", 1, "Mapped to Edge TPU"),
    ]
    assert report.ops_not_mapped == []


def test_parse_compiler_output_report_with_ops_on_cpu():
    report = parse_compiler_output(REPORT_SOME_ON_CPU)

    assert report.off_chip_memory_bytes == 1536
    assert report.operations_on_edgetpu == 8
    assert report.operations_on_cpu == 3
    assert len(report.operators) == 6
    assert report.ops_not_mapped == [
        OperatorStatus("SOFTMAX", 1, UNSPECIFIED),
        OperatorStatus(
            "DEQUANTIZE", 2, "Operation is working on an unsupported data type"
        ),
    ]
    assert sum(row.count for row in report.ops_not_mapped) == report.operations_on_cpu


def test_parse_compiler_output_log_file_format():
    report = parse_compiler_output(LOG_FILE_TEXT)

    assert report.compiler_version == "16.0.384591198"
    assert report.input_model == "step_int8.tflite"
    assert report.output_model == "step_int8_edgetpu.tflite"
    assert report.edgetpu_subgraphs is None
    assert [row.name for row in report.ops_not_mapped] == ["SOFTMAX"]


def test_parse_compiler_output_failure_and_empty_text():
    report = parse_compiler_output(FAILURE_OUTPUT)
    assert report.compiler_version == "16.0.384591198"
    assert report.succeeded is False
    assert report.operators == []

    assert parse_compiler_output("") == CompilerReport()


# ------------------------------------------------------------- check_compiled


def test_check_compiled_accepts_all_mapped_single_subgraph():
    check_compiled(parse_compiler_output(REPORT_ALL_MAPPED), CELL_OPS)


def test_check_compiled_accepts_head_ops_on_cpu():
    # SOFTMAX and DEQUANTIZE are not cell operators; one Edge TPU subgraph remains.
    check_compiled(parse_compiler_output(REPORT_SOME_ON_CPU), CELL_OPS)


def test_check_compiled_rejects_unmapped_cell_op_and_two_subgraphs():
    report = parse_compiler_output(REPORT_CELL_ON_CPU)

    with pytest.raises(ModelError) as error:
        check_compiled(report, {"FULLY_CONNECTED", "LOGISTIC", "MUL", "TANH", "SUB"})

    message = str(error.value)
    assert f"TANH x1 ({UNSPECIFIED})" in message
    assert "SUB x1 (More than one subgraph is not supported)" in message
    assert "2 Edge TPU subgraphs" in message
    assert "\n" not in message


def test_check_compiled_rejects_cell_op_even_with_one_subgraph():
    report = parse_compiler_output(REPORT_SOME_ON_CPU)

    with pytest.raises(ModelError, match="SOFTMAX x1"):
        check_compiled(report, CELL_OPS | {"softmax"})


def test_check_compiled_rejects_missing_or_zero_subgraphs():
    with pytest.raises(ModelError, match="no 'Number of Edge TPU subgraphs' line"):
        check_compiled(parse_compiler_output(LOG_FILE_TEXT), {"ADD"})

    zero = parse_compiler_output(
        REPORT_ALL_MAPPED.replace("subgraphs: 1", "subgraphs: 0")
    )
    with pytest.raises(ModelError, match="nothing runs on the Edge TPU"):
        check_compiled(zero, CELL_OPS)


# ------------------------------------------------------------ no compiler here


def test_find_compiler_returns_none_without_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_compiler() is None


def test_compile_model_without_compiler_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    model = tmp_path / "step_int8.tflite"
    model.write_bytes(b"\x1c\x00\x00\x00TFL3")

    with pytest.raises(RuntimeUnavailableError) as error:
        compile_model(model, tmp_path / "out")

    message = str(error.value)
    assert "edgetpu_compiler is not installed" in message
    assert "edgetpu-compiler package from Coral's apt repository" in message
    assert "x86-64 Debian/Ubuntu only" in message


# ---------------------------------------------------------- mock compiler runs

MOCK_COMPILER = """\
#!{python}
# MOCK edgetpu_compiler for tests: prints documented-format output.
import os, pathlib, sys, time

args = sys.argv[1:]
pathlib.Path(os.environ["MOCK_ARGV_FILE"]).write_text("\\n".join(args))
if args == ["--version"]:
    print("Edge TPU Compiler version 16.0.384591198")
    sys.exit(0)

mode = os.environ.get("MOCK_MODE", "ok")
out_dir = pathlib.Path(args[args.index("-o") + 1])
model = pathlib.Path(args[-1])
stem = model.stem
if mode == "hang":
    pathlib.Path(os.environ["MOCK_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(60)
if mode == "fail":
    sys.stdout.write(os.environ["MOCK_OUTPUT"])
    sys.exit(1)
if mode != "nooutput":
    (out_dir / (stem + "_edgetpu.tflite")).write_bytes(model.read_bytes() + b"edgetpu")
    (out_dir / (stem + "_edgetpu.log")).write_text(os.environ["MOCK_LOG"])
sys.stdout.write(os.environ["MOCK_OUTPUT"])
"""


@pytest.fixture()
def mock_compiler(tmp_path, monkeypatch):
    """A MOCK edgetpu_compiler first on PATH; returns its path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "edgetpu_compiler"
    script.write_text(MOCK_COMPILER.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("MOCK_ARGV_FILE", str(tmp_path / "argv.txt"))
    monkeypatch.setenv("MOCK_PID_FILE", str(tmp_path / "pid.txt"))
    monkeypatch.setenv("MOCK_LOG", LOG_FILE_TEXT)
    monkeypatch.setenv("MOCK_OUTPUT", REPORT_ALL_MAPPED)
    return str(script)


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "models" / "step_int8.tflite"
    path.parent.mkdir()
    path.write_bytes(b"\x1c\x00\x00\x00TFL3fake-model")
    return path


def test_compile_model_with_mock_compiler_parses_report_and_output(
    mock_compiler, model_file, tmp_path
):
    out_dir = tmp_path / "compiled" / "nested"

    result = compile_model(model_file, out_dir)

    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv == ["-s", "-o", str(out_dir), str(model_file)]
    assert find_compiler() == mock_compiler
    assert result.output_path == out_dir / "step_int8_edgetpu.tflite"
    assert result.output_path.read_bytes() == model_file.read_bytes() + b"edgetpu"
    assert result.log_path == out_dir / "step_int8_edgetpu.log"
    assert result.report.edgetpu_subgraphs == 1
    assert result.report.on_chip_memory_bytes == 2816
    assert [row.name for row in result.report.operators] == [
        "FULLY_CONNECTED",
        "ADD",
        "TANH",
        "SOFTMAX",
    ]
    assert "Compilation succeeded!" in result.output_text
    assert result.elapsed_s > 0
    check_compiled(result.report, CELL_OPS)


def test_compile_model_with_mock_compiler_reads_table_from_log(
    mock_compiler, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOCK_OUTPUT", SUMMARY_ONLY)

    result = compile_model(model_file, tmp_path / "out")

    assert result.report.edgetpu_subgraphs == 1  # from stdout
    assert [row.name for row in result.report.ops_not_mapped] == ["SOFTMAX"]  # from log


def test_compile_model_with_mock_compiler_failure_raises_model_error(
    mock_compiler, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOCK_MODE", "fail")
    monkeypatch.setenv("MOCK_OUTPUT", FAILURE_OUTPUT)

    with pytest.raises(ModelError) as error:
        compile_model(model_file, tmp_path / "out")

    assert str(error.value).startswith(
        "edgetpu_compiler exited with code 1 on step_int8.tflite: ERROR: Didn't find "
        "op for builtin opcode 'FULLY_CONNECTED' version '12'"
    )


def test_compile_model_with_mock_compiler_missing_output_raises(
    mock_compiler, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOCK_MODE", "nooutput")

    with pytest.raises(ModelError, match="wrote no step_int8_edgetpu.tflite"):
        compile_model(model_file, tmp_path / "out")


def test_compile_model_with_mock_compiler_timeout_stops_it(
    mock_compiler, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOCK_MODE", "hang")
    started = time.monotonic()

    with pytest.raises(ModelError, match="did not finish step_int8.tflite within 1 s"):
        compile_model(model_file, tmp_path / "out", timeout_s=1)

    assert time.monotonic() - started < 20
    pid = int((tmp_path / "pid.txt").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped by compile_model


def test_compiler_version_with_mock_compiler(mock_compiler, tmp_path):
    assert compiler_version(mock_compiler) == "16.0.384591198"
    assert (tmp_path / "argv.txt").read_text() == "--version"


def test_compiler_version_of_non_compiler_raises(tmp_path):
    fake = tmp_path / "not_a_compiler"
    fake.write_text(textwrap.dedent("#!/bin/sh\necho hello\n"))
    fake.chmod(0o755)

    with pytest.raises(RuntimeUnavailableError, match="printed no 'Edge TPU Compiler"):
        compiler_version(str(fake))
    with pytest.raises(RuntimeUnavailableError, match="cannot run"):
        compiler_version(str(tmp_path / "absent"))


def test_compile_model_missing_model_raises(mock_compiler, tmp_path):
    with pytest.raises(ManifestError, match="no such model file"):
        compile_model(tmp_path / "absent.tflite", tmp_path / "out")
