"""``edgernn demo``: the whole pipeline on real recordings, with no hardware.

1. Build the BasicMotions model (or reuse the folder if built from the same inputs).
2. Create a virtual serial link: a pseudo-terminal pair.
3. Start ``edgernnd`` as a separate process on the terminal's device side, and
   wait for its READY=1 on a real systemd notification socket.
4. Replay the BasicMotions test recordings into the other side, several at once.
5. Collect what the daemon publishes (its stdout, or an MQTT broker), then stop it
   with SIGTERM and print a table: true and predicted label per recording,
   accuracy, frames per second, and latency from a frame written to the port to
   its prediction received.
"""

from __future__ import annotations

import argparse
import json
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

import numpy as np

from edgernn import datasets
from edgernn.replay import replay
from edgernnd.errors import EdgernnError

READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 30.0


class _Collector:
    """Predictions received per stream, in order, with their arrival times.

    The daemon runs each stream's frames in order, so the k-th prediction of a
    stream belongs to the k-th frame sent on it.
    """

    def __init__(self):
        self.records: dict[int, list[dict]] = {}
        self.arrival: dict[int, list[float]] = {}
        self.count = 0
        self.changed = threading.Condition()

    def add(self, record: dict) -> None:
        stream = int(record["stream"])
        with self.changed:
            self.records.setdefault(stream, []).append(record)
            self.arrival.setdefault(stream, []).append(time.monotonic())
            self.count += 1
            self.changed.notify_all()

    def get(self, stream: int, position: int) -> dict | None:
        records = self.records.get(stream, [])
        return records[position] if position < len(records) else None

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True


def _read_stdout(stream, collector: _Collector) -> None:
    for line in stream:
        try:
            collector.add(json.loads(line))
        except (ValueError, KeyError):
            sys.stderr.write(f"demo: unexpected line from edgernnd: {line[:200]!r}\n")


def _subscribe_mqtt(host: str, port: int, client_id: str, collector: _Collector):
    import paho.mqtt.client as mqtt

    subscribed = threading.Event()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"{client_id}-viewer")

    def on_connect(c, userdata, flags, reason_code, properties):
        c.subscribe(f"edgernn/{client_id}/+/+/prediction", qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(c, userdata, message):
        collector.add(json.loads(message.payload))

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, port)
    except OSError as e:
        raise EdgernnError(f"cannot reach the MQTT broker at {host}:{port}: {e}; start "
                           "one (e.g. mosquitto) or drop --mqtt") from e
    client.loop_start()
    if not subscribed.wait(10):
        raise EdgernnError(f"the MQTT broker at {host}:{port} did not accept a "
                           "subscription within 10 s")
    return client


def _wait_ready(sock: socket.socket, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EdgernnError(f"edgernnd exited with code {process.returncode} before "
                               "it was ready (its log is above)")
        sock.settimeout(0.2)
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in message.split("\n"):
            return
    raise EdgernnError(f"edgernnd did not report READY=1 within {READY_TIMEOUT_S:.0f} s")


def run_demo(args: argparse.Namespace) -> int:
    from edgernn.cli import main as edgernn_main

    out = args.out
    code = edgernn_main(["build", "--data", "basicmotions", "--out", str(out),
                         "--reuse"])
    if code:
        return code
    _, test = datasets.load_builtin("basicmotions")

    workdir = Path(tempfile.mkdtemp(prefix="edgernn-demo-"))
    try:
        return _run_with_workdir(args, out, test, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_with_workdir(args: argparse.Namespace, out: Path, test, workdir: Path) -> int:
    collector = _Collector()
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    command = [sys.executable, "-m", "edgernnd.cli", "--model-dir", str(out),
               "--port", tty, "--format", args.format, "--accelerator", "cpu"]
    mqtt_client = None
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":")
        if not host or not port.isdigit():
            raise EdgernnError(f"--mqtt must be HOST:PORT, got {args.mqtt!r}")
        config = workdir / "edgernnd.toml"
        config.write_text(
            f'[model]\ndir = "{Path(out).resolve()}"\naccelerator = "cpu"\n'
            f'[[port]]\nurl = "{tty}"\nformat = "{args.format}"\n'
            f'[publish]\nsink = "mqtt"\n'
            f'[mqtt]\nhost = "{host}"\nport = {int(port)}\nclient_id = "demo"\n')
        command = [sys.executable, "-m", "edgernnd.cli", "--config", str(config)]
        try:
            mqtt_client = _subscribe_mqtt(host, int(port), "demo", collector)
        except EdgernnError:
            for fd in (master, slave):
                os.close(fd)
            notify.close()
            raise

    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
    print(f"starting edgernnd on {tty} (virtual serial link)", file=sys.stderr)
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None,
                              env=env, text=True)
    reader = None
    try:
        os.close(slave)
        _wait_ready(notify, daemon)
        if mqtt_client is None:
            reader = threading.Thread(target=_read_stdout,
                                      args=(daemon.stdout, collector), daemon=True)
            reader.start()
        print(f"streaming {len(test)} BasicMotions test recordings, {args.streams} at "
              f"a time, {args.format} format", file=sys.stderr)

        def show(done: int, total: int) -> None:
            sys.stderr.write(f"\r  written {done}/{total} frames, "
                             f"{collector.count} predictions received")
            sys.stderr.flush()

        def write_all(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(master, view):]

        started = time.monotonic()
        result = replay(test.sequences, test.labels, write_all, args.format,
                        rate_hz=10.0, speed=args.speed, streams=args.streams,
                        record_times=True, progress=show)
        complete = collector.wait_for(result.frames, DRAIN_TIMEOUT_S)
        last = max((t[-1] for t in collector.arrival.values()), default=started)
        elapsed = last - started
        show(result.frames, result.frames)
        sys.stderr.write("\n")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if mqtt_client is not None:
            mqtt_client.loop_stop()
            mqtt_client.disconnect()
        os.close(master)
        notify.close()

    print(_table(result, collector, test))
    latencies = np.array([
        (arrived - written) * 1000.0
        for stream, times in result.write_times.items()
        for written, arrived in zip(times, collector.arrival.get(stream, []))])
    correct = sum(1 for p in result.played
                  if (collector.get(p.stream_id, p.last_frame) or {}).get("label")
                  == p.label)
    print(f"\naccuracy at the last frame: {correct}/{len(result.played)} = "
          f"{correct / len(result.played):.1%}")
    print(f"predictions: {collector.count}/{result.frames} frames, "
          f"{collector.count / max(elapsed, 1e-9):.0f} frames/s end to end")
    if len(latencies):
        print(f"latency, frame written to prediction received: median "
              f"{np.median(latencies):.2f} ms, 99th percentile "
              f"{np.percentile(latencies, 99):.2f} ms")
    sink = f"MQTT broker {args.mqtt}" if args.mqtt else "edgernnd's stdout"
    print(f"(predictions made by edgernnd in process {daemon.pid} from frames that "
          f"crossed {tty}; received through {sink})")
    if not complete:
        print(f"edgernn: error: {result.frames - collector.count} predictions "
              "never arrived", file=sys.stderr)
        return 1
    if daemon.returncode != 0:
        print(f"edgernn: error: edgernnd exited with {daemon.returncode}",
              file=sys.stderr)
        return 1
    return 0


def _table(result, collector: _Collector, test) -> str:
    rows = [f"{'recording':>9}  {'stream':>6}  {'true label':<10}  "
            f"{'predicted':<10}  {'confidence':>10}"]
    for p in sorted(result.played, key=lambda p: p.index):
        record = collector.get(p.stream_id, p.last_frame)
        predicted = record["label"] if record else "(missing)"
        confidence = f"{record['confidence']:.3f}" if record else "-"
        mark = "" if record and predicted == p.label else "  <- wrong"
        rows.append(f"{p.index:>9}  {p.stream_id:>6}  {p.label:<10}  {predicted:<10}  "
                    f"{confidence:>10}{mark}")
    return "\n".join(rows)
