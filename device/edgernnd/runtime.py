"""Finding a TFLite runtime and making interpreters, with or without the Edge TPU.

``tflite_runtime`` is preferred (it is what Raspberry Pi OS users install), then
``ai_edge_litert`` (its successor). TensorFlow itself is never imported here.

Known traps handled here:
- ``tflite-runtime`` 2.14 (its last release) was built against numpy 1 and crashes
  creating an interpreter under numpy 2; :func:`import_runtime` refuses that pair with
  a message saying how to fix it instead of letting it crash.
- The PyPI project called ``pycoral`` is unrelated to Google's; Google's pycoral
  (from Coral's apt repository) is used only to list Edge TPUs when importable. The
  delegate is loaded directly from ``libedgetpu.so.1`` in every case.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Any, NamedTuple

import numpy as np

from edgernnd.errors import RuntimeUnavailableError

logger = logging.getLogger(__name__)

EDGETPU_LIBRARY = "libedgetpu.so.1"


class Runtime(NamedTuple):
    """An importable TFLite runtime.

    Attributes:
        name: ``tflite_runtime`` or ``ai_edge_litert``.
        version: Its version string.
        interpreter_class: Its ``Interpreter``.
        load_delegate: Its ``load_delegate`` function.
    """

    name: str
    version: str
    interpreter_class: Any
    load_delegate: Any


def import_runtime(preferred: str | None = None) -> Runtime:
    """Imports the first usable TFLite runtime.

    Args:
        preferred: ``tflite_runtime`` or ``ai_edge_litert`` to try only that one;
            default from the environment variable ``EDGERNN_RUNTIME``, else both
            in that order.

    Raises:
        RuntimeUnavailableError: None is installed, or the installed one cannot
            work with this numpy.
    """
    preferred = preferred or os.environ.get("EDGERNN_RUNTIME") or None
    names = [preferred] if preferred else ["tflite_runtime", "ai_edge_litert"]
    problems = []
    for name in names:
        try:
            if name == "tflite_runtime":
                import tflite_runtime
                from tflite_runtime import interpreter as module
            elif name == "ai_edge_litert":
                import ai_edge_litert
                from ai_edge_litert import interpreter as module
            else:
                raise RuntimeUnavailableError(
                    f"EDGERNN_RUNTIME={name!r} is not a runtime; use tflite_runtime "
                    "or ai_edge_litert"
                )
        except ImportError as e:
            problems.append(f"{name}: {e}")
            continue
        if name == "tflite_runtime":
            version = getattr(tflite_runtime, "__version__", "unknown")
            if int(np.__version__.split(".")[0]) >= 2 and version.startswith("2.14"):
                problems.append(
                    f"tflite_runtime {version} crashes under numpy {np.__version__}"
                )
                if preferred:
                    raise RuntimeUnavailableError(
                        f"tflite-runtime {version} was built for numpy 1 and crashes "
                        f"under numpy {np.__version__}; run: pip install 'numpy<2' "
                        "(or use ai-edge-litert)"
                    )
                continue
        else:
            version = getattr(ai_edge_litert, "__version__", "unknown")
        return Runtime(name, version, module.Interpreter, module.load_delegate)
    raise RuntimeUnavailableError(
        "no TFLite runtime is usable ("
        + "; ".join(problems)
        + "); install one: pip install 'edgernn[device]'"
    )


def make_interpreter(model: bytes | str | os.PathLike, runtime: Runtime | None = None,
                     delegates: list | None = None, num_threads: int = 1) -> Any:
    """Creates an interpreter with its tensors allocated.

    Args:
        model: The ``.tflite`` file's bytes or its path.
        runtime: From :func:`import_runtime` (imported when None).
        delegates: Loaded delegates (the Edge TPU's), or None for the CPU.
        num_threads: CPU threads for the interpreter; 1 keeps the other cores for
            serial reading and publishing, and a step model is too small to split.
    """
    runtime = runtime or import_runtime()
    kwargs: dict[str, Any] = {"experimental_delegates": delegates or None,
                              "num_threads": num_threads}
    if isinstance(model, (bytes, bytearray)):
        kwargs["model_content"] = bytes(model)
    else:
        kwargs["model_path"] = os.fspath(model)
    try:
        interpreter = runtime.interpreter_class(**kwargs)
        interpreter.allocate_tensors()
    except ValueError as e:
        raise RuntimeUnavailableError(
            f"{runtime.name} {runtime.version} cannot load the model: "
            f"{str(e).splitlines()[0]}; rebuild it with 'edgernn build'"
        ) from e
    return interpreter


def load_edgetpu_delegate(runtime: Runtime, device: str | None = None) -> Any:
    """Loads the Edge TPU delegate from ``libedgetpu.so.1``.

    Args:
        runtime: The TFLite runtime whose ``load_delegate`` is used.
        device: ``usb``, ``usb:0``, ``pci:0``... or None for the first Edge TPU.

    Raises:
        RuntimeUnavailableError: with the likely cause: the library is not
            installed, no Edge TPU is plugged in, or the user may not open it.
    """
    options = {"device": device} if device else {}
    # Open the library first: a failed load_delegate leaves a half-built Delegate
    # whose destructor prints a stray traceback (tflite_runtime 2.14), and a
    # missing library is the commonest failure.
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError as e:
        raise RuntimeUnavailableError(explain_edgetpu_failure(str(e))) from e
    try:
        return runtime.load_delegate(EDGETPU_LIBRARY, options)
    except (ValueError, OSError) as e:
        raise RuntimeUnavailableError(explain_edgetpu_failure(str(e))) from e


def explain_edgetpu_failure(message: str) -> str:
    """Turns a delegate load failure into one line with the likely fix."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if "cannot open shared object" in message or "No such file" in message:
        return (f"the Edge TPU runtime {EDGETPU_LIBRARY} is not installed ({first}); "
                "install libedgetpu1-std from Coral's apt repository")
    if "ermission" in message:
        return (f"the Edge TPU is present but this user may not open it ({first}); "
                "install systemd/99-edgernn.rules and add the user to plugdev")
    if "version" in message.lower():
        return (f"the Edge TPU runtime does not match the compiled model ({first}); "
                "update libedgetpu1-std or recompile with a matching edgetpu_compiler")
    return (f"no usable Edge TPU ({first}); check that the Coral is plugged in "
            "(lsusb shows 1a6e:089a or 18d1:9302) or that /dev/apex_0 exists")


def list_edgetpus() -> list[dict] | None:
    """Edge TPUs found by Google's pycoral, or None when it is not installed.

    Only Google's pycoral (Coral's apt repository) has ``pycoral.utils.edgetpu``;
    the unrelated PyPI project of the same name does not, and is ignored.
    """
    try:
        from pycoral.utils import edgetpu  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return list(edgetpu.list_edge_tpus())
    except Exception as e:  # noqa: BLE001 - a foreign library; report and move on
        logger.warning("pycoral could not list Edge TPUs: %s", e)
        return None


def describe_platform() -> str:
    """One line saying where we run, for the start-up log."""
    return f"{platform.machine()} Python {platform.python_version()} numpy {np.__version__}"
