"""A real edgernnd process on pseudo-terminals, watched from outside.

The daemon runs as ``python -m edgernnd.cli --config FILE`` with one
pseudo-terminal per port; the benchmark writes sensor bytes into the controller
side. Each stdout line (one JSON prediction) is stamped with time.monotonic() by a
reader thread the moment it is read and kept as bytes, to be parsed after the run
so that parsing never delays the stamping. ``READY=1`` arrives on a real datagram
socket named by ``NOTIFY_SOCKET``. CPU time and memory come from /proc.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.child import child_environment
from edgernnd.errors import EdgernnError

logger = logging.getLogger(__name__)

CLOCK_TICKS_HZ = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 15.0


class PtyPort:
    """A pseudo-terminal pair: the daemon opens ``path``, the benchmark writes."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)

    def write(self, data: bytes) -> None:
        """Writes everything, blocking while the terminal's buffer is full."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def write_config(path: Path, model_dir: str | os.PathLike, ports: list[PtyPort],
                 metrics_file: Path, pin_cpu: bool = True) -> None:
    """A TOML configuration: ports named p0, p1, ...; stdout sink; no snapshots."""
    lines = ["[model]", f"dir = {json.dumps(str(model_dir))}", 'accelerator = "cpu"',
             f"pin_cpu = {'true' if pin_cpu else 'false'}", ""]
    for i, port in enumerate(ports):
        lines += ["[[port]]", f"url = {json.dumps(port.path)}", f'name = "p{i}"',
                  "baudrate = 921600", 'format = "binary"', ""]
    lines += ["[state]", "snapshot_interval_s = 0", "",
              "[metrics]", f"textfile = {json.dumps(str(metrics_file))}",
              "interval_s = 1.0", ""]
    path.write_text("\n".join(lines))


class DaemonProcess:
    """edgernnd in a child process.

    Args:
        model_dir: The model folder.
        ports: Pseudo-terminals, configured as ports p0, p1, ...
        work_dir: For the configuration, the notify socket, logs and metrics.
        runtime: ``tflite_runtime`` or ``ai_edge_litert`` (EDGERNN_RUNTIME).
        cpus: CPUs to pin the daemon to (all its threads), or None.

    Attributes:
        lines: (time.monotonic() when read, raw line) per stdout line.
        started_at: time.monotonic() just before the process was created.
        ready_at: time.monotonic() when READY=1 arrived, or None.
    """

    def __init__(self, model_dir: str | os.PathLike, ports: list[PtyPort],
                 work_dir: Path, runtime: str, cpus: set[int] | None = None):
        tag = f"{runtime}-{time.monotonic_ns()}"
        self.work_dir = work_dir
        self.config_path = work_dir / f"edgernnd-{tag}.toml"
        self.metrics_path = work_dir / f"metrics-{tag}.prom"
        self.stderr_path = work_dir / f"edgernnd-{tag}.log"
        # cpus=None measures the daemon spread over every CPU, so it must not
        # pin itself (model.pin_cpu, its default).
        write_config(self.config_path, model_dir, ports, self.metrics_path,
                     pin_cpu=cpus is not None)
        # A socket path is limited to 107 bytes, which a deep work_dir (pytest's
        # temporary folders) can exceed: the socket gets a short folder of its own.
        self._notify_dir = tempfile.mkdtemp(prefix="edgernn-")
        notify_path = Path(self._notify_dir) / f"notify-{tag}.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify.settimeout(0.1)
        self.lines: list[tuple[float, bytes]] = []
        self.ready_at: float | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        env = child_environment(runtime)
        env["NOTIFY_SOCKET"] = str(notify_path)
        self._stderr = open(self.stderr_path, "wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgernnd.cli", "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        if cpus is not None:
            # Threads created later inherit the main thread's affinity; the
            # interpreter has not started any yet this soon after exec.
            os.sched_setaffinity(self.process.pid, cpus)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_notify, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stdout(self) -> None:
        lines = self.lines
        stdout = self.process.stdout
        while True:
            line = stdout.readline()
            if not line:
                return
            lines.append((time.monotonic(), line))

    def _read_notify(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self._notify.recv(4096)
            except (TimeoutError, OSError):
                continue
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = time.monotonic()
                self._ready.set()

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Seconds from process creation to READY=1.

        Raises:
            EdgernnError: No READY=1 within the timeout, or the daemon exited.
        """
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise EdgernnError("edgernnd did not become ready:\n"
                                   + self.stderr_tail())
        return self.ready_at - self.started_at

    def wait_lines(self, count: int, timeout_s: float) -> bool:
        """Waits until ``count`` lines were read; False at the timeout."""
        deadline = time.monotonic() + timeout_s
        while len(self.lines) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                return len(self.lines) >= count
            time.sleep(0.01)
        return True

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> int:
        """Waits until no line arrived for ``quiet_s``; returns the line count."""
        deadline = time.monotonic() + timeout_s
        last = len(self.lines)
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(min(0.02, quiet_s / 4))
            now_count = len(self.lines)
            if now_count != last:
                last, last_change = now_count, time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                break
        return len(self.lines)

    def cpu_s(self) -> float:
        """User plus system CPU seconds of the whole process so far."""
        return read_cpu_s(Path(f"/proc/{self.pid}/stat"))

    def thread_cpu_s(self) -> dict[int, float]:
        """CPU seconds per thread id (the main thread's id is the pid)."""
        result = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                result[int(task.name)] = read_cpu_s(task / "stat")
            except (OSError, ValueError):
                continue
        return result

    def memory_mb(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak RSS) in MiB from /proc/PID/status."""
        return read_memory_mb(Path(f"/proc/{self.pid}/status"))

    def allowed_cpus(self) -> set[str]:
        """The distinct Cpus_allowed_list of every thread."""
        lists = set()
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        lists.add(line.split(":", 1)[1].strip())
            except OSError:
                continue
        return lists

    def stop(self) -> int:
        """SIGTERM, wait, close; returns the exit code (kills after a timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("edgernnd %d did not stop in %.0f s; killing it", self.pid,
                           STOP_TIMEOUT_S)
            self.process.kill()
            code = self.process.wait()
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._notify.close()
        shutil.rmtree(self._notify_dir, ignore_errors=True)
        self._stderr.close()
        return code

    def metrics(self) -> dict[str, float]:
        """The metrics textfile the daemon wrote at shutdown, summed per name."""
        try:
            return parse_metrics_totals(self.metrics_path.read_text())
        except OSError:
            return {}

    def stderr_tail(self, lines: int = 15) -> str:
        self._stderr.flush()
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def records(self) -> list[tuple[float, dict]]:
        """The stdout lines parsed: (read time, JSON record)."""
        return [(t, json.loads(line)) for t, line in self.lines]


def read_cpu_s(stat_path: Path) -> float:
    """utime + stime in seconds from a /proc .../stat file."""
    text = stat_path.read_text()
    # The command name (field 2) may hold spaces; fields after it are plain.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_HZ


def read_memory_mb(status_path: Path) -> dict[str, float]:
    """VmRSS and VmHWM in MiB from a /proc/PID/status file."""
    result = {}
    for line in status_path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            result[key] = int(value.split()[0]) / 1024.0
    return result


def parse_metrics_totals(text: str) -> dict[str, float]:
    """Prometheus text format to {metric name: sum over its series}."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals
