"""What the figures were measured on: CPU, cores, memory, and software versions.

Versions are read from the installed distributions' metadata, so nothing heavy
(TensorFlow) is imported to learn them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

DISTRIBUTIONS = ("numpy", "tflite-runtime", "ai-edge-litert", "tensorflow-cpu",
                 "tensorflow", "keras", "pyserial", "edgernn")


def read_cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (x86 ``model name``, ARM ``Model`` or ``Hardware``)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown"
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and key not in found:
            found[key] = value.strip()
    for key in ("model name", "Model", "Hardware"):
        if found.get(key):
            return found[key]
    return platform.processor() or "unknown"


def read_memory_total_mb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """MemTotal in MiB, or None when /proc/meminfo is unreadable."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_versions() -> dict[str, str | None]:
    """Installed version per distribution name (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_machine() -> dict:
    """The machine and software as a JSON-ready dict."""
    return {
        "cpu_model": read_cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "memory_total_mb": read_memory_total_mb(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "versions": read_versions(),
        "load_average_at_start": list(os.getloadavg()),
    }
