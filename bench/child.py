"""Running the TensorFlow-free measurements in child processes.

``tflite_runtime`` 2.14 cannot load a model in a process that has imported
TensorFlow 2.21, and the device never has TensorFlow anyway; so every invoke is
timed in a fresh child (``python -m bench.invoke`` or ``python -m bench.pipeline``)
that refuses to import TensorFlow or Keras. A child reads its job from a JSON file
and writes its result to another.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgernnd.errors import EdgernnError

REPO = Path(__file__).resolve().parents[1]
BLOCKED_MODULES = ("tensorflow", "keras", "tf_keras")


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``import tensorflow`` (and keras) fail in this process."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED_MODULES:
            raise ImportError(f"{fullname} must not be imported in a timing child "
                              "(it would share the process with the TFLite runtime)")
        return None


def block_tensorflow() -> None:
    """Installs the import blocker; raises if TensorFlow is already loaded."""
    loaded = [m for m in BLOCKED_MODULES if m in sys.modules]
    if loaded:
        raise EdgernnError(f"{loaded} already imported; run the timing in a fresh "
                           "process")
    sys.meta_path.insert(0, _Blocker())


def child_environment(runtime: str | None = None) -> dict[str, str]:
    """The environment of a child: the repository on the path, a runtime chosen."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if runtime:
        env["EDGERNN_RUNTIME"] = runtime
    return env


def run_child(module: str, job: dict, work_dir: Path, name: str,
              runtime: str | None = None, timeout_s: float = 900.0) -> dict:
    """Runs ``python -m <module> job.json result.json`` and returns the result.

    The child's output goes to ``<work_dir>/<name>.log``.

    Raises:
        EdgernnError: The child failed or timed out; the message ends with the
            last lines of its log.
    """
    job_path = work_dir / f"{name}.job.json"
    result_path = work_dir / f"{name}.result.json"
    log_path = work_dir / f"{name}.log"
    job_path.write_text(json.dumps(job, indent=1))
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            code = subprocess.run(
                [sys.executable, "-m", module, str(job_path), str(result_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env=child_environment(runtime), timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    if code != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        what = "timed out" if code is None else f"exited with {code}"
        raise EdgernnError(f"{module} ({name}) {what} after "
                           f"{time.monotonic() - started:.0f} s:\n" + "\n".join(tail))
    return json.loads(result_path.read_text())


def read_job(argv: list[str] | None) -> tuple[dict, Path]:
    """(job, result path) from a child's ``JOB.json RESULT.json`` arguments.

    A job with ``cpus`` (a list of CPU numbers) pins this process to them first.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m MODULE JOB.json RESULT.json")
    job = json.loads(Path(args[0]).read_text())
    if job.get("cpus"):
        os.sched_setaffinity(0, set(job["cpus"]))
    return job, Path(args[1])


def write_result(result: dict, path: Path) -> None:
    """Writes a child's result, noting whether TensorFlow stayed out."""
    result["tensorflow_imported"] = any(m in sys.modules for m in BLOCKED_MODULES)
    result["cpus"] = sorted(os.sched_getaffinity(0))
    path.write_text(json.dumps(result, indent=1))


def serve_job(run: Callable[[dict], dict], argv: list[str] | None = None) -> int:
    """The whole life of a child: no TensorFlow, read the job, run it, write."""
    block_tensorflow()
    job, out = read_job(argv)
    write_result(run(job), out)
    return 0
