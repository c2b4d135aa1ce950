"""Load on a real edgernnd through pseudo-terminals: rate, drops, latency, memory.

Every run starts a fresh daemon (:class:`bench.daemon_proc.DaemonProcess`) and
feeds it real BasicMotions frames in the binary wire format:

- :func:`measure_ready`: seconds from process creation to ``READY=1``.
- :func:`measure_throughput`: one port kept busy; predictions per second, as a
  multiple of one serial port's frame rate.
- :func:`run_paced`: several ports, each written at a fixed frame rate on a
  schedule; frames sent against predictions received, the daemon's CPU use,
  and the latency from each frame's write to its prediction's read.
- :func:`measure_memory`: VmRSS and VmHWM with 1 stream and with 64 streams.

A pseudo-terminal has no baud rate: bytes move as fast as both sides go. Serial
capacity is therefore computed, not emulated: a UART sends 10 bits per byte (start,
8 data, stop), so a port at B baud carries B / 10 / frame_bytes frames a second,
where frame_bytes counts the COBS-encoded frame and its delimiter.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.daemon_proc import DaemonProcess, PtyPort
from bench.timing import percentile
from edgernnd.binary_codec import encode_frame

SEQ_CYCLE = 1 << 16
BITS_PER_BYTE = 10  # start bit, 8 data bits, stop bit
WARMUP_S = 0.5
QUIET_S = 0.5
DRAIN_TIMEOUT_S = 20.0
# The throughput writer's bound on frames in flight, and its write size: about
# 0.2 s of work for the daemon, written 2.5 kB at a time.
MAX_BACKLOG_FRAMES = 2048
WRITE_FRAMES = 64


class FramePool:
    """All 65536 sequence numbers of one stream, encoded once.

    Sequence numbers wrap at 65536, so cycling through the pool looks to the
    daemon like one endless gap-free stream.

    Args:
        recordings: Raw float32 (frames, features) recordings, played in turn.
        stream_id: The stream id in every frame.
    """

    def __init__(self, recordings: list[np.ndarray], stream_id: int = 0):
        values = np.concatenate(recordings).astype(np.float32)
        frames = [encode_frame(stream_id, seq, values[seq % len(values)],
                               sensor_time_ms=seq * 10) for seq in range(SEQ_CYCLE)]
        self.frame_bytes = len(frames[0])
        self.data = b"".join(frames)
        self.offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])])

    def take(self, start: int, count: int) -> bytes:
        """Frames start, start+1, ... (count of them) as wire bytes, wrapping."""
        parts = []
        while count > 0:
            first = start % SEQ_CYCLE
            n = min(count, SEQ_CYCLE - first)
            parts.append(self.data[self.offsets[first]:self.offsets[first + n]])
            start, count = start + n, count - n
        return b"".join(parts)


def serial_capacity_fps(baudrate: int, frame_bytes: int) -> float:
    """Frames per second one UART at ``baudrate`` carries (10 bits per byte)."""
    return baudrate / BITS_PER_BYTE / frame_bytes


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Runs the block with this process pinned to ``cpus`` (None: as it is)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _start(model_dir, ports, work_dir, runtime, cpus=None) -> DaemonProcess:
    daemon = DaemonProcess(model_dir, ports, work_dir, runtime, cpus)
    try:
        daemon.wait_ready()
    except Exception:
        daemon.stop()
        raise
    return daemon


def measure_ready(model_dir, runtime: str, work_dir: Path, repeats: int) -> dict:
    """Median seconds from process creation to READY=1 over fresh starts (1 port)."""
    runs = []
    for _ in range(repeats):
        port = PtyPort()
        daemon = DaemonProcess(model_dir, [port], work_dir, runtime)
        try:
            runs.append(daemon.wait_ready())
        finally:
            daemon.stop()
            port.close()
    return {"median_s": statistics.median(runs), "runs_s": runs}


def measure_throughput(model_dir, runtime: str, work_dir: Path, pool: FramePool,
                       windows: int, window_s: float,
                       daemon_cpus: set[int] | None = None,
                       own_cpus: set[int] | None = None) -> dict:
    """Predictions per second with one port kept busy.

    The writer keeps at most :data:`MAX_BACKLOG_FRAMES` frames written but not yet
    predicted: enough that the daemon never waits for bytes, few enough that its
    queue (bounded in chunks, not frames) never holds seconds of backlog. The
    rate is the median over ``windows`` consecutive windows of ``window_s``
    after a warm-up.
    """
    with pinned(own_cpus):
        return _measure_throughput(model_dir, runtime, work_dir, pool, windows,
                                   window_s, daemon_cpus)


def _measure_throughput(model_dir, runtime, work_dir, pool, windows, window_s,
                        daemon_cpus) -> dict:
    port = PtyPort()
    daemon = _start(model_dir, [port], work_dir, runtime, daemon_cpus)
    stop = threading.Event()
    written = [0]

    def blast() -> None:
        lines = daemon.lines
        while not stop.is_set():
            if written[0] - len(lines) < MAX_BACKLOG_FRAMES:
                port.write(pool.take(written[0], WRITE_FRAMES))
                written[0] += WRITE_FRAMES
            else:
                stop.wait(0.0005)

    writer = threading.Thread(target=blast, daemon=True)
    try:
        writer.start()
        time.sleep(WARMUP_S)
        marks = [(time.monotonic(), len(daemon.lines), daemon.cpu_s())]
        for _ in range(windows):
            time.sleep(window_s)
            marks.append((time.monotonic(), len(daemon.lines), daemon.cpu_s()))
        stop.set()
        writer.join(timeout=10.0)
        received = daemon.wait_quiet(QUIET_S, DRAIN_TIMEOUT_S)
    finally:
        stop.set()
        code = daemon.stop()
        port.close()
    rates = [(c1 - c0) / (t1 - t0) for (t0, c0, _), (t1, c1, _) in zip(marks, marks[1:])]
    cpu = (marks[-1][2] - marks[0][2]) / (marks[-1][0] - marks[0][0])
    fps = statistics.median(rates)
    metrics = daemon.metrics()
    return {"fps": fps, "fps_windows": rates, "window_s": window_s,
            "frame_bytes": pool.frame_bytes, "frames_written": written[0],
            "predictions": received, "cpu_cores_used": cpu,
            "x_115200": fps / serial_capacity_fps(115200, pool.frame_bytes),
            "x_921600": fps / serial_capacity_fps(921600, pool.frame_bytes),
            "frames_dropped_by_daemon": metrics.get("edgernn_frames_dropped_total"),
            "daemon_cpus": sorted(daemon_cpus) if daemon_cpus else "all",
            "exit_code": code}


def write_paced(ptys: list[PtyPort], pool: FramePool, rate_hz: float,
                frames_total: int) -> tuple[np.ndarray, float, float]:
    """Writes ``frames_total`` frames to every port at ``rate_hz``, on a schedule.

    Every tick (1 ms, or one frame period if longer) the frames due by then go to
    each port in turn, and their write time (time.monotonic()) is kept.

    Returns:
        (write times float64 (ports, frames_total), seconds spent, the writer's
        largest lag behind its schedule in seconds).
    """
    tick_s = max(1.0 / rate_hz, 0.001)
    write_times = np.zeros((len(ptys), frames_total))
    started = time.monotonic()
    sent, ticks, max_lag = 0, 0, 0.0
    while sent < frames_total:
        ticks += 1
        due_at = started + ticks * tick_s
        now = time.monotonic()
        if due_at > now:
            time.sleep(due_at - now)
        else:
            max_lag = max(max_lag, now - due_at)
        due = min(frames_total, math.floor(rate_hz * (due_at - started)))
        if due <= sent:
            continue
        for i, pty in enumerate(ptys):
            pty.write(pool.take(sent, due - sent))
            write_times[i, sent:due] = time.monotonic()
        sent = due
    return write_times, time.monotonic() - started, max_lag


def split_latencies(records: list[tuple[float, dict]], write_times: np.ndarray,
                    since: float) -> tuple[dict[str, list[float]], list[int]]:
    """Latency of every prediction of a frame written at or after ``since``.

    Args:
        records: (read time, record) of the daemon's stdout lines; the record's
            ``port`` is ``p<i>`` and its ``seq`` indexes ``write_times[i]``.
        write_times: From :func:`write_paced`.
        since: time.monotonic() before which frames count as warm-up.

    Returns:
        ({"total", "to_daemon", "in_daemon", "to_reader"}: milliseconds each, and
        predictions per port). to_daemon ends when the daemon read the bytes
        (its host_time), in_daemon is the record's latency_ms, to_reader the rest
        (publisher queue, stdout pipe, this process's reader thread).
    """
    # The daemon's host_time is its monotonic read time plus the wall clock's
    # offset; CLOCK_MONOTONIC is one clock for the whole system, so the same
    # offset turns it back into this process's time base.
    wall_offset = time.time() - time.monotonic()
    parts: dict[str, list[float]] = {"total": [], "to_daemon": [], "in_daemon": [],
                                     "to_reader": []}
    per_port = [0] * len(write_times)
    for read_at, record in records:
        port = int(record["port"][1:])
        per_port[port] += 1
        written_at = float(write_times[port, record["seq"]])
        if written_at < since:
            continue
        total_ms = (read_at - written_at) * 1000.0
        to_daemon_ms = (record["host_time"] - wall_offset - written_at) * 1000.0
        parts["total"].append(total_ms)
        parts["to_daemon"].append(to_daemon_ms)
        parts["in_daemon"].append(record["latency_ms"])
        parts["to_reader"].append(total_ms - to_daemon_ms - record["latency_ms"])
    return parts, per_port


def run_paced(model_dir, runtime: str, work_dir: Path, pool: FramePool, ports: int,
              rate_hz: float, duration_s: float, daemon_cpus: set[int] | None = None,
              own_cpus: set[int] | None = None) -> dict:
    """``ports`` ports, one stream each, written at ``rate_hz`` frames/s each.

    Returns:
        sent, received, missing (sent - received), the daemon's drop counters,
        the share of the offered rate it processed in time, CPU use (cores)
        during the load, latency percentiles in milliseconds (the first
        ``WARMUP_S`` left out) split into their parts, and how far the writer
        fell behind its schedule.
    """
    frames_total = int(rate_hz * duration_s)
    if frames_total >= SEQ_CYCLE:
        raise ValueError(f"{frames_total} frames per port would reuse sequence "
                         "numbers; shorten duration_s")
    ptys = [PtyPort() for _ in range(ports)]
    with pinned(own_cpus):
        daemon = _start(model_dir, ptys, work_dir, runtime, daemon_cpus)
        try:
            cpu_before, threads_before = daemon.cpu_s(), daemon.thread_cpu_s()
            allowed = sorted(daemon.allowed_cpus())
            started = time.monotonic()
            write_times, write_s, max_lag = write_paced(ptys, pool, rate_hz,
                                                        frames_total)
            cpu_after, threads_after = daemon.cpu_s(), daemon.thread_cpu_s()
            received = daemon.wait_quiet(QUIET_S, DRAIN_TIMEOUT_S)
            drained_s = max(daemon.lines[-1][0] - (started + write_s), 0.0) if (
                daemon.lines) else 0.0
        finally:
            code = daemon.stop()
            for pty in ptys:
                pty.close()
    metrics = daemon.metrics()
    parts, per_port = split_latencies(daemon.records(), write_times,
                                      started + WARMUP_S)
    sent = frames_total * ports
    # Received over the time from the first write to the last prediction: the
    # offered rate when the daemon keeps up, less when a backlog had to drain.
    processed_fps = received / (write_s + drained_s)
    main_thread = threads_after.get(daemon.pid, 0.0) - threads_before.get(daemon.pid, 0.0)
    result = {
        "ports": ports, "rate_hz_per_port": rate_hz, "duration_s": duration_s,
        "target_fps": rate_hz * ports, "sent": sent, "received": received,
        "missing": sent - received, "received_per_port": per_port,
        "processed_fps": processed_fps,
        "processed_share": processed_fps / (rate_hz * ports),
        "achieved_send_fps": sent / write_s, "writer_max_lag_ms": max_lag * 1000.0,
        "drain_after_last_write_s": drained_s,
        "cpu_cores_used": (cpu_after - cpu_before) / write_s,
        "main_thread_cores_used": main_thread / write_s,
        "daemon_cpus": sorted(daemon_cpus) if daemon_cpus else "all",
        "daemon_cpus_allowed": allowed, "exit_code": code,
        "frames_dropped_by_daemon": metrics.get("edgernn_frames_dropped_total"),
        "predictions_dropped_by_daemon":
            metrics.get("edgernn_predictions_dropped_total"),
        "seq_gaps": metrics.get("edgernn_seq_gaps_total"),
    }
    if parts["total"]:
        latencies = parts["total"]
        result["latency_ms"] = {
            "median": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": max(latencies), "samples": len(latencies)}
        result["latency_parts_ms"] = {
            name: {"median": percentile(v, 50), "p99": percentile(v, 99)}
            for name, v in parts.items() if name != "total"}
    return result


def measure_memory(model_dir, runtime: str, work_dir: Path, recordings: list[np.ndarray],
                   streams: int = 64, frames_per_stream: int = 50) -> dict:
    """VmRSS and VmHWM (MiB) at READY, with 1 stream, then with ``streams``."""
    port = PtyPort()
    daemon = _start(model_dir, [port], work_dir, runtime)
    values = np.concatenate(recordings).astype(np.float32)
    result = {}
    try:
        result["ready"] = daemon.memory_mb()
        port.write(b"".join(encode_frame(0, t, values[t])
                            for t in range(frames_per_stream)))
        daemon.wait_lines(frames_per_stream, DRAIN_TIMEOUT_S)
        result["streams_1"] = daemon.memory_mb()
        port.write(b"".join(encode_frame(s, frames_per_stream + t,
                                         values[(s * 7 + t) % len(values)])
                            for t in range(frames_per_stream)
                            for s in range(streams)))
        ok = daemon.wait_lines(frames_per_stream * (streams + 1), DRAIN_TIMEOUT_S)
        result[f"streams_{streams}"] = daemon.memory_mb()
        result["all_predictions_received"] = ok
    finally:
        daemon.stop()
        port.close()
    return result


def combine_runs(runs: list[dict]) -> dict:
    """Repeated runs of one measurement as one: numbers become their median.

    Nested dicts are combined key by key; anything else (lists, strings, None,
    flags) is taken from the first run. Every run is kept under ``runs``.
    """
    combined = _median_tree(runs)
    combined["runs"] = runs
    return combined


def _median_tree(values: list):
    first = values[0]
    if isinstance(first, dict):
        return {key: _median_tree([v[key] for v in values])
                for key in first if all(isinstance(v, dict) and key in v
                                        for v in values)}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    return first

