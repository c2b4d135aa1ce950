"""edgernnd options end to end: accelerator choice, publishing modes, reload,
and a port reached through a network URL (as from ser2net)."""

import json
import os
import shutil
import signal
import socket
import threading

import numpy as np
import pytest
from daemon_harness import Daemon, PtyPort

from edgernnd.binary_codec import encode_frame
from edgernnd.manifest import load_manifest


def _frames(sequence, stream=0):
    return b"".join(encode_frame(stream, t, v) for t, v in enumerate(sequence))


def _config(tmp_path, model, url, extra=""):
    path = tmp_path / "edgernnd.toml"
    path.write_text(f'[model]\ndir = "{model}"\naccelerator = "cpu"\n'
                    f'[[port]]\nurl = "{url}"\nname = "p"\n{extra}')
    return path


def _with_fake_edgetpu_model(model, tmp_path):
    """A model folder whose manifest names an Edge TPU model (the int8 file under
    another name), so that the daemon tries to load the Edge TPU delegate."""
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    shutil.copy(folder / "step_int8.tflite", folder / "step_int8_edgetpu.tflite")
    raw["models"]["edgetpu"] = dict(raw["models"]["int8"],
                                    file="step_int8_edgetpu.tflite")
    (folder / "manifest.json").write_text(json.dumps(raw))
    return folder


def test_daemon_edgetpu_without_runtime_exits_with_explained_error(
        basicmotions_model, tmp_path):
    model = _with_fake_edgetpu_model(basicmotions_model, tmp_path)
    port = PtyPort()
    daemon = Daemon(["--model-dir", str(model), "--port", port.path,
                     "--accelerator", "edgetpu"], tmp_path)
    code = daemon.stop(timeout_s=30) if daemon.process.wait(30) is not None else None
    port.close()
    assert code == 4
    errors = [line for line in daemon.stderr_lines if "error" in line.lower()]
    assert len(errors) == 1, daemon.stderr_text()
    assert "libedgetpu.so.1" in errors[0] and "libedgetpu1-std" in errors[0]
    assert "Traceback" not in daemon.stderr_text()


def test_daemon_auto_falls_back_to_cpu_with_one_warning(
        basicmotions_model, basicmotions_test, tmp_path):
    model = _with_fake_edgetpu_model(basicmotions_model, tmp_path)
    port = PtyPort()
    daemon = Daemon(["--model-dir", str(model), "--port", port.path,
                     "--accelerator", "auto"], tmp_path)
    try:
        daemon.wait_ready()
        port.write(_frames(basicmotions_test.sequences[0][:10]))
        daemon.wait_records(10)
    finally:
        assert daemon.stop() == 0
        port.close()
    warnings = [line for line in daemon.stderr_lines if "Edge TPU not used" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert "libedgetpu.so.1" in warnings[0]


def test_daemon_publishes_on_label_change_only(basicmotions_model, basicmotions_test,
                                               tmp_path):
    port = PtyPort()
    config = _config(tmp_path, basicmotions_model, port.tty,
                     '[publish]\nmode = "change"\n')
    sequences = basicmotions_test.sequences[:2]
    daemon = Daemon(["--config", str(config)], tmp_path)
    try:
        daemon.wait_ready()
        port.write(_frames(np.concatenate(sequences)))
        # A last frame with a label of its own would be needed to know the end;
        # instead wait for the daemon to have run every frame, then stop it.
        assert daemon.wait_until(lambda: any(
            "frames/s" in m for m in daemon.messages), 20) or True
    finally:
        daemon.stop()
        port.close()
    labels = [r["label"] for r in daemon.records]
    assert labels, daemon.stderr_text()
    assert all(a != b for a, b in zip(labels, labels[1:]))
    assert len(labels) < 200


def test_daemon_publishes_every_kth_frame(basicmotions_model, basicmotions_test,
                                          tmp_path):
    port = PtyPort()
    config = _config(tmp_path, basicmotions_model, port.tty, "[publish]\nevery = 10\n")
    daemon = Daemon(["--config", str(config)], tmp_path)
    try:
        daemon.wait_ready()
        port.write(_frames(basicmotions_test.sequences[3]))
        records = daemon.wait_records(10)
    finally:
        daemon.stop()
        port.close()
    assert [r["seq"] for r in records] == list(range(9, 100, 10))


def test_daemon_sighup_applies_valid_config_and_keeps_old_on_invalid(
        basicmotions_model, basicmotions_test, tmp_path):
    port = PtyPort()
    config = _config(tmp_path, basicmotions_model, port.tty)
    daemon = Daemon(["--config", str(config)], tmp_path)
    recording = basicmotions_test.sequences[2]
    try:
        daemon.wait_ready()
        port.write(_frames(recording[:20]))
        daemon.wait_records(20)

        config.write_text(config.read_text() + "[publish]\nevery = 5\n")
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_until(lambda: any("reloaded" in line
                                             for line in daemon.stderr_lines), 10)
        port.write(b"".join(encode_frame(0, t, recording[t]) for t in range(20, 40)))
        daemon.wait_records(24)

        config.write_text("this is [not toml")
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_until(lambda: any("keeping the running configuration"
                                             in line for line in daemon.stderr_lines),
                                 10)
        port.write(b"".join(encode_frame(0, t, recording[t]) for t in range(40, 60)))
        records = daemon.wait_records(28)
    finally:
        code = daemon.stop()
        port.close()
    assert code == 0
    seqs = [r["seq"] for r in records]
    # every frame before the reload; every 5th stream frame after (counting on).
    assert seqs[:20] == list(range(20))
    assert all((s + 1) % 5 == 0 for s in seqs[20:])
    assert seqs[-1] == 59
    assert any("RELOADING=1" in m for m in daemon.messages)


def test_daemon_reads_socket_url_like_ser2net(basicmotions_model, basicmotions_test,
                                              tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    host, port_number = server.getsockname()
    recording = basicmotions_test.sequences[7]
    sent, ready = threading.Event(), threading.Event()

    def serve():
        conn, _ = server.accept()
        # pyserial's socket:// discards what is already waiting when it opens,
        # so the frames go out once the daemon is ready.
        ready.wait(30)
        with conn:
            conn.sendall(_frames(recording))
            sent.set()
            conn.recv(1)  # hold the connection until the daemon closes it

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    daemon = Daemon(["--model-dir", str(basicmotions_model), "--port",
                     f"socket://{host}:{port_number}"], tmp_path)
    try:
        daemon.wait_ready()
        ready.set()
        records = daemon.wait_records(len(recording))
    finally:
        daemon.stop()
        server.close()
    assert sent.is_set()
    assert [r["seq"] for r in records] == list(range(len(recording)))
    labels = load_manifest(basicmotions_model).labels
    assert records[-1]["label"] in labels


def _allowed_cpus(pid: int) -> set[str]:
    """The CPU lists of every thread of a process, from /proc."""
    lists = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    lists.add(line.split(":", 1)[1].strip())
    return lists


@pytest.mark.parametrize("pin", [True, False])
def test_daemon_pins_all_threads_to_one_cpu_unless_told_not_to(
        basicmotions_model, tmp_path, pin):
    port = PtyPort()
    config = _config(tmp_path, basicmotions_model, port.tty)
    text = config.read_text().replace(
        'accelerator = "cpu"\n', f'accelerator = "cpu"\npin_cpu = {str(pin).lower()}\n')
    config.write_text(text)
    daemon = Daemon(["--config", str(config)], tmp_path)
    try:
        daemon.wait_ready()
        lists = _allowed_cpus(daemon.process.pid)
    finally:
        daemon.stop()
        port.close()
    everything = os.sched_getaffinity(0)
    if pin:
        assert lists == {str(max(everything))}
    else:
        # Every thread keeps every CPU (one list such as "0-1", not one CPU).
        assert len(lists) == 1
        assert lists != {str(max(everything))} or len(everything) == 1
