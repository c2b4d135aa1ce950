"""A real edgernnd process on pseudo-terminals, for the tests.

The daemon runs as a separate process (``python -m edgernnd.cli``) reading the
device side of one pseudo-terminal per port; the test writes sensor bytes into the
controller side. Its stdout (JSON lines) is collected by a thread, and its systemd
notifications arrive on a real datagram socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NO_TENSORFLOW = REPO / "tests" / "no_tensorflow"


class PtyPort:
    """A pseudo-terminal pair; the daemon opens ``path``, the test writes ``master``."""

    def __init__(self, link: Path | None = None, raw: bool = False):
        self.master, slave = os.openpty()
        if raw:
            # What pyserial sets when it opens the port, set beforehand: bytes
            # written before the daemon opens it are neither echoed back into
            # the controller side nor line-edited.
            tty.setraw(slave)
        self.tty = os.ttyname(slave)
        os.close(slave)
        self.link = link
        if link is not None:
            # A stable name that is re-pointed on "replug", like a udev symlink.
            tmp = link.with_suffix(".new")
            os.symlink(self.tty, tmp)
            os.replace(tmp, link)

    @property
    def path(self) -> str:
        return str(self.link) if self.link is not None else self.tty

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def close(self) -> None:
        """Closes the controller side: the daemon's reads fail as on an unplug.

        A link still pointing here goes too, as udev removes a by-id link when
        the device goes; otherwise it would name a /dev/pts number that the
        kernel may give to another pseudo-terminal.
        """
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        if self.link is not None:
            try:
                if os.readlink(self.link) == self.tty:
                    os.unlink(self.link)
            except OSError:  # already gone
                pass


class Daemon:
    """edgernnd in a child process, with its stdout records and notifications.

    Args:
        args: Command-line arguments of ``edgernnd``.
        tmp_path: Where the notification socket goes.
        env: Extra environment variables.
        block_tensorflow: Make TensorFlow and Keras fail to import in the child.
        umask: The child's umask (default: inherited).
    """

    def __init__(self, args: list[str], tmp_path: Path, env: dict | None = None,
                 block_tensorflow: bool = True, umask: int | None = None):
        self.notify_path = tmp_path / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        self.records: list[dict] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path),
                        PYTHONUNBUFFERED="1", **(env or {}))
        if block_tensorflow:
            # The device half must not need TensorFlow or Keras: make them fail
            # to import in the daemon's process.
            full_env["PYTHONPATH"] = os.pathsep.join(
                [str(NO_TENSORFLOW), full_env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgernnd.cli", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=full_env,
            umask=-1 if umask is None else umask)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_notify, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            with self._cond:
                self.records.append(json.loads(line))
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            with self._cond:
                self.stderr_lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def _read_notify(self) -> None:
        while self.process.poll() is None or self._pending_notify():
            try:
                data = self.notify.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def _pending_notify(self) -> bool:
        try:
            self.notify.settimeout(0.05)
            data = self.notify.recv(4096)
        except (TimeoutError, OSError):
            return False
        with self._cond:
            self.messages.append(data.decode())
        return True

    def wait_until(self, predicate, timeout_s: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None
                                 and not predicate()):
                    # One last look once the process is gone.
                    return predicate()
                self._cond.wait(min(left, 0.2))
        return True

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        ok = self.wait_until(lambda: any("READY=1" in m.split("\n")
                                         for m in self.messages), timeout_s)
        assert ok, "edgernnd not ready:\n" + "\n".join(self.stderr_lines[-20:])

    def wait_records(self, count: int, timeout_s: float = 20.0) -> list[dict]:
        ok = self.wait_until(lambda: len(self.records) >= count, timeout_s)
        assert ok, (f"{len(self.records)}/{count} records:\n"
                    + "\n".join(self.stderr_lines[-20:]))
        return list(self.records)

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        for t in self._threads:
            t.join(timeout=5)
        self.notify.close()
        return code

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)

    @property
    def pid(self) -> int:
        return self.process.pid

    def count_stderr(self, text: str) -> int:
        """Lines of the daemon's stderr so far that contain ``text``."""
        with self._cond:
            return sum(text in line for line in self.stderr_lines)

    def wait_stderr(self, text: str, count: int = 1, timeout_s: float = 20.0) -> bool:
        """Waits until ``count`` stderr lines contain ``text``; False on timeout."""
        return self.wait_until(
            lambda: sum(text in line for line in self.stderr_lines) >= count,
            timeout_s)

    def proc_counts(self) -> tuple[int, int]:
        """(open file descriptors, threads) of the daemon, from /proc."""
        return (len(os.listdir(f"/proc/{self.pid}/fd")),
                len(os.listdir(f"/proc/{self.pid}/task")))

    def rss_kb(self) -> int:
        """The daemon's resident set size (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")


def write_config(path: Path, sections: dict) -> Path:
    """Writes a TOML configuration from ``{"section": {key: value}}``.

    ``port`` is a list of tables (``[[port]]``). Values may be str, Path, bool,
    int or float; a section given as such a value is written as a top-level key.
    """
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))  # a JSON string is a TOML basic string

    # Top-level keys (not tables, to write a bad file) go before any table.
    lines = [f"{name} = {value(body)}" for name, body in sections.items()
             if not isinstance(body, (dict, list))]
    for name, body in sections.items():
        if not isinstance(body, (dict, list)):
            continue
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def read_metrics(path: Path) -> dict[str, float]:
    """A Prometheus textfile as ``{'name{labels}': value}`` ({} while missing)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, number = line.rpartition(" ")
            values[series] = float(number)
    return values


def metric_sum(values: dict[str, float], name: str) -> float:
    """The sum over every series of one metric in :func:`read_metrics` output."""
    return sum(v for k, v in values.items()
               if k == name or k.startswith(name + "{"))


def wait_metrics(path: Path, predicate, timeout_s: float = 20.0,
                 poll_s: float = 0.05) -> dict[str, float]:
    """Re-reads a metrics textfile until ``predicate(values)`` holds.

    The daemon rewrites the file every ``metrics.interval_s``; polling it is
    the only way to see it change.

    Raises:
        AssertionError: The predicate still fails after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        values = read_metrics(path)
        if predicate(values):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics in {path} never satisfied the "
                                 f"condition; last: {values}")
        time.sleep(poll_s)


def expected_scores(model_dir: Path, recordings: list[np.ndarray], tmp_path: Path,
                    runtime: str = "tflite_runtime") -> list[np.ndarray]:
    """The int8 model run directly on each recording from a zero state.

    Runs in a child process that cannot import TensorFlow, like the daemon
    (tflite_runtime 2.14 cannot load a model beside TensorFlow).

    Args:
        recordings: float32 (frames, features) each.

    Returns:
        float32 (frames, classes) scores per recording.
    """
    inputs = tmp_path / f"recordings-{time.monotonic_ns()}.npz"
    out = inputs.with_suffix(".expected.npz")
    np.savez(inputs, *recordings)
    code = (
        "import sys, numpy as np\n"
        "from edgernnd.manifest import load_manifest\n"
        "from edgernnd.runner import StepRunner\n"
        "from edgernnd.runtime import import_runtime\n"
        "runner = StepRunner(load_manifest(sys.argv[1]), 'int8', "
        "import_runtime(sys.argv[4]))\n"
        "data = np.load(sys.argv[2])\n"
        "np.savez(sys.argv[3], *[runner.run_sequence(data[f'arr_{i}'])"
        " for i in range(len(data.files))])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(inputs), str(out),
                    runtime], check=True,
                   env=dict(os.environ, PYTHONPATH=str(NO_TENSORFLOW)))
    with np.load(out) as data:
        return [data[f"arr_{i}"] for i in range(len(recordings))]


def scores_of(records: list[dict], labels: tuple[str, ...]) -> np.ndarray:
    """float32 (records, classes): the published scores in label order."""
    return np.array([[r["scores"][k] for k in labels] for r in records], np.float32)


def daemon_config(model_dir: Path, ports: dict[str, str], **sections: dict) -> dict:
    """A configuration dict for :func:`write_config`: the model on the CPU, one
    binary ``[[port]]`` per ``{name: path}``, and the given sections."""
    config = {"model": {"dir": model_dir, "accelerator": "cpu"},
              "port": [{"url": path, "name": name, "format": "binary"}
                       for name, path in ports.items()]}
    config.update(sections)
    return config
