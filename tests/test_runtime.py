"""Choosing a TFLite runtime and explaining Edge TPU failures."""

import numpy as np
import pytest

from edgernnd import runtime
from edgernnd.errors import RuntimeUnavailableError


def test_import_runtime_prefers_tflite_runtime():
    assert runtime.import_runtime().name == "tflite_runtime"


@pytest.mark.parametrize("name", ["tflite_runtime", "ai_edge_litert"])
def test_import_runtime_honours_environment(monkeypatch, name):
    monkeypatch.setenv("EDGERNN_RUNTIME", name)
    chosen = runtime.import_runtime()
    assert chosen.name == name and chosen.version[0].isdigit()


def test_import_runtime_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv("EDGERNN_RUNTIME", "tensorflow")
    with pytest.raises(RuntimeUnavailableError, match="not a runtime"):
        runtime.import_runtime()


def test_import_runtime_refuses_tflite_runtime_214_under_numpy_2(monkeypatch):
    # A stand-in for numpy 2 (only its version string): tflite-runtime 2.14 and
    # numpy 2 cannot be installed together here, and together they crash.
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'numpy<2'"):
        runtime.import_runtime("tflite_runtime")
    assert runtime.import_runtime().name == "ai_edge_litert"


@pytest.mark.parametrize("message, fix", [
    ("libedgetpu.so.1: cannot open shared object file: No such file or directory",
     "install libedgetpu1-std"),
    ("Failed to open device: Permission denied", "99-edgernn.rules"),
    ("Edge TPU runtime version mismatch", "recompile"),
    ("Failed to load delegate from libedgetpu.so.1", "lsusb"),
])
def test_explain_edgetpu_failure_names_the_fix(message, fix):
    line = runtime.explain_edgetpu_failure(message)
    assert fix in line and "\n" not in line


def test_load_edgetpu_delegate_without_library_explains():
    with pytest.raises(RuntimeUnavailableError, match="libedgetpu1-std"):
        runtime.load_edgetpu_delegate(runtime.import_runtime())


def test_make_interpreter_reports_bad_model_in_one_line(tmp_path):
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"TFL3" + b"\x00" * 60)
    with pytest.raises(RuntimeUnavailableError, match="cannot load the model"):
        runtime.make_interpreter(path)
