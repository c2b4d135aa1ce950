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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_TENSORFLOW = REPO / "tests" / "no_tensorflow"


class PtyPort:
    """A pseudo-terminal pair; the daemon opens ``path``, the test writes ``master``."""

    def __init__(self, link: Path | None = None):
        self.master, slave = os.openpty()
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
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class Daemon:
    """edgernnd in a child process, with its stdout records and notifications."""

    def __init__(self, args: list[str], tmp_path: Path, env: dict | None = None,
                 block_tensorflow: bool = True):
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
            stderr=subprocess.PIPE, text=True, env=full_env)
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
