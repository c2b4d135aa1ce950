"""Bad configurations and damaged model folders, run as ``edgernnd`` processes.

Every bad input is run twice, as the daemon (``--config FILE``) and as
``--check-config``: both must exit non-zero with exactly one line on stderr that
names the problem, and no traceback.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemon_harness import (
    NO_TENSORFLOW,
    Daemon,
    PtyPort,
    daemon_config,
    metric_sum,
    wait_metrics,
    write_config,
)

from edgernnd.binary_codec import encode_frame
from edgernnd.manifest import sha256_file

CONFIG_ERROR, MANIFEST_ERROR, RUNTIME_ERROR = 2, 3, 4
RUN_TIMEOUT_S = 60.0


def edit_manifest(model: Path, change) -> None:
    path = model / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def set_in(section: str, **values):
    def change(config, tmp):
        config.setdefault(section, {}).update(values)
    return change


def set_port(**values):
    def change(config, tmp):
        config["port"][0].update(values)
    return change


def truncate_int8(model: Path, update_sha: bool) -> None:
    path = model / "step_int8.tflite"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    if update_sha:
        edit_manifest(model, lambda m: m["models"]["int8"].update(
            sha256=sha256_file(path)))


def five_features(manifest: dict) -> None:
    frame = manifest["frame"]
    frame["features"] = 5
    for key in ("mean", "std", "channel_names"):
        frame[key] = frame[key][:5]


# name: (change to the config dict (config, tmp) or None, change to the copied
#        model folder or None, exit code, what the message must contain)
CASES = {
    "unknown_section": (set_in("sensors", rate=10), None, CONFIG_ERROR,
                        "unknown section [sensors]"),
    "unknown_key": (set_in("state", snapshot_every=5), None, CONFIG_ERROR,
                    "unknown key state.snapshot_every"),
    "wrong_type_number": (set_in("state", idle_reset_s="5s"), None, CONFIG_ERROR,
                          "state.idle_reset_s must be a number, got '5s'"),
    "wrong_type_bool_for_int": (set_port(baudrate=True), None, CONFIG_ERROR,
                                "port[0].baudrate must be an integer"),
    "section_not_a_table": (lambda c, t: c.update(log="debug"), None, CONFIG_ERROR,
                            "[log] must be a table"),
    "baudrate_zero": (set_port(baudrate=0), None, CONFIG_ERROR,
                      "port[0].baudrate must be a positive baud rate"),
    "format_unknown": (set_port(format="json"), None, CONFIG_ERROR,
                       "port[0].format must be one of"),
    "no_port": (lambda c, t: c.pop("port"), None, CONFIG_ERROR, "no [[port]]"),
    "duplicate_port_names": (lambda c, t: c["port"].append(dict(c["port"][0])), None,
                             CONFIG_ERROR, "port names must be unique"),
    "qos_3": (set_in("mqtt", qos=3), None, CONFIG_ERROR, "mqtt.qos must be 0, 1 or 2"),
    "mqtt_port_too_big": (set_in("mqtt", port=70000), None, CONFIG_ERROR, "mqtt.port"),
    "negative_snapshot_interval": (set_in("state", snapshot_interval_s=-1.0), None,
                                   CONFIG_ERROR, "state.snapshot_interval_s"),
    "negative_metrics_interval": (set_in("metrics", interval_s=-0.5), None,
                                  CONFIG_ERROR, "metrics.interval_s"),
    "negative_idle_reset": (set_in("state", idle_reset_s=-5), None, CONFIG_ERROR,
                            "state.idle_reset_s"),
    "queue_size_zero": (set_in("publish", queue_size=0), None, CONFIG_ERROR,
                        "publish.queue_size"),
    "staggered_copies_over_reset_every": (
        set_in("state", staggered_copies=4, reset_every=2), None, CONFIG_ERROR,
        "state.reset_every must be >= staggered_copies (4)"),
    "password_file_missing": (
        lambda c, t: c.setdefault("mqtt", {}).update(
            username="edge", password_file=str(t / "no-such-password")),
        None, CONFIG_ERROR, "mqtt.password_file"),
    "password_file_without_username": (
        lambda c, t: c.setdefault("mqtt", {}).update(
            password_file=str(t / "edgernnd.toml")),
        None, CONFIG_ERROR, "mqtt.username"),
    "tls_ca_file_missing": (
        lambda c, t: c.setdefault("mqtt", {}).update(tls_ca_file=str(t / "no-ca.pem")),
        None, CONFIG_ERROR, "mqtt.tls_ca_file"),
    "tls_ca_file_not_a_certificate": (
        lambda c, t: c.setdefault("mqtt", {}).update(
            tls_ca_file=str(t / "edgernnd.toml")),
        None, CONFIG_ERROR, "a file of PEM CA certificates"),
    "metrics_listen_without_port": (set_in("metrics", listen="127.0.0.1"), None,
                                    CONFIG_ERROR, "metrics.listen must be HOST:PORT"),
    "metrics_listen_not_loopback": (set_in("metrics", listen="0.0.0.0:9108"), None,
                                    CONFIG_ERROR, "a loopback address"),
    "sink_file_without_file": (set_in("publish", sink="file"), None, CONFIG_ERROR,
                               "publish.file must be a path"),
    "sink_file_in_missing_directory": (
        lambda c, t: c.setdefault("publish", {}).update(
            sink="file", file=str(t / "no-such-dir" / "predictions.jsonl")),
        None, CONFIG_ERROR, "publish.file must be a path in an existing directory"),
    "log_level_unknown": (set_in("log", level="verbose"), None, CONFIG_ERROR,
                          "log.level"),
    "model_dir_missing": (lambda c, t: c["model"].update(dir=str(t / "no-model")),
                          None, MANIFEST_ERROR, "no manifest at"),
    "manifest_missing": (None, lambda m: (m / "manifest.json").unlink(),
                         MANIFEST_ERROR, "no manifest at"),
    "manifest_not_json": (None, lambda m: (m / "manifest.json").write_text("{"),
                          MANIFEST_ERROR, "is not valid JSON"),
    "manifest_sha256_mismatch": (
        None, lambda m: edit_manifest(m, lambda x: x["models"]["int8"].update(
            sha256="0" * 64)),
        MANIFEST_ERROR, "does not match the manifest"),
    "tflite_truncated": (None, lambda m: truncate_int8(m, update_sha=False),
                         MANIFEST_ERROR, "step_int8.tflite' does not match"),
    "tflite_missing": (None, lambda m: (m / "step_int8.tflite").unlink(),
                       MANIFEST_ERROR, "is missing"),
    "manifest_newer_format": (
        None, lambda m: edit_manifest(m, lambda x: x.update(format_version=2)),
        MANIFEST_ERROR, "format_version 2"),
    "manifest_inconsistent": (
        None, lambda m: edit_manifest(m, lambda x: x["frame"].update(features=5)),
        MANIFEST_ERROR, "inconsistent: mean, std and channel_names"),
    "manifest_frame_width_not_the_model": (
        None, lambda m: edit_manifest(m, five_features), MANIFEST_ERROR,
        "has shape (1, 6), the manifest says (1, 5)"),
    "edgetpu_without_edgetpu_model": (
        lambda c, t: c["model"].update(accelerator="edgetpu"), None, RUNTIME_ERROR,
        "no Edge TPU model"),
}


@pytest.fixture
def base(basicmotions_model, tmp_path):
    """A valid configuration dict on a real pseudo-terminal, and the port."""
    port = PtyPort()
    yield daemon_config(basicmotions_model, {"imu": port.path}), port
    port.close()


def run_edgernnd(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgernnd.cli", *args], capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(NO_TENSORFLOW),
             **(env or {})})


def run_both(config_path: Path, env: dict | None = None):
    """(daemon run, --check-config run) of one configuration, side by side."""
    with ThreadPoolExecutor(2) as pool:
        daemon = pool.submit(run_edgernnd, ["--config", str(config_path)], env)
        check = pool.submit(run_edgernnd, ["--config", str(config_path),
                                           "--check-config"], env)
        return daemon.result(), check.result()


def assert_one_line_error(result, code: int, message: str) -> None:
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgernnd: error: ") and message in lines[0], lines[0]
    assert result.returncode == code, result.stderr


def prepare(name: str, base, tmp_path) -> Path:
    change_config, change_model, _, _ = CASES[name]
    config, _ = base
    if change_model is not None:
        model = tmp_path / "model"
        shutil.copytree(config["model"]["dir"], model)
        config["model"]["dir"] = model
        change_model(model)
    path = tmp_path / "edgernnd.toml"
    write_config(path, config)  # exists first: some cases point at it
    if change_config is not None:
        change_config(config, tmp_path)
        write_config(path, config)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_exits_with_one_line(name, base, tmp_path):
    _, _, code, message = CASES[name]
    daemon, check = run_both(prepare(name, base, tmp_path))
    assert_one_line_error(daemon, code, message)
    assert_one_line_error(check, code, message)


@pytest.mark.parametrize("name, text, message", [
    ("invalid_toml", "[model\ndir = ", "not valid TOML"),
    ("port_not_an_array", '[model]\ndir = "m"\n[port]\nurl = "/dev/null"\n',
     "'port' must be an array of tables"),
    ("not_utf8", b"[model]\ndir = \"\xff\"\n", "not UTF-8 text (byte 0xff"),
])
def test_bad_config_file_text_exits_with_one_line(name, text, message, tmp_path):
    path = tmp_path / "edgernnd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    for result in run_both(path):
        assert_one_line_error(result, CONFIG_ERROR, message)


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_config_path_not_a_file_exits_with_one_line(kind, tmp_path):
    path = tmp_path / "edgernnd.toml"
    if kind == "directory":
        path.mkdir()
    message = "cannot read configuration" if kind == "directory" else "does not exist"
    for result in run_both(path):
        assert_one_line_error(result, CONFIG_ERROR, message)


def test_good_config_passes_check(base, tmp_path):
    config, _ = base
    path = write_config(tmp_path / "edgernnd.toml", config)
    check = run_edgernnd(["--config", str(path), "--check-config"])
    assert (check.returncode, check.stderr) == (0, "")
    assert check.stdout.startswith("configuration OK: 1 ports, model BasicMotions")


def test_missing_port_fails_check_but_daemon_waits_for_it(base, tmp_path):
    config, _ = base
    missing = str(tmp_path / "by-id" / "usb-imu-if00")
    config["port"][0]["url"] = missing
    path = write_config(tmp_path / "edgernnd.toml", config)

    check = run_edgernnd(["--config", str(path), "--check-config"])
    assert_one_line_error(check, CONFIG_ERROR, f"port[0].url {missing!r} does not exist")

    daemon = Daemon(["--config", str(path)], tmp_path)
    try:
        daemon.wait_ready()
        assert daemon.wait_stderr(f"port imu ({missing}) cannot be opened")
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in daemon.stderr_text()


def test_frame_width_mismatch_shows_as_rejected_frames(base, tmp_path):
    config, port = base
    textfile = tmp_path / "edgernnd.prom"
    config["metrics"] = {"textfile": textfile, "interval_s": 0.2}
    path = write_config(tmp_path / "edgernnd.toml", config)
    daemon = Daemon(["--config", str(path)], tmp_path)
    try:
        daemon.wait_ready()
        # A sender configured for 5 channels; the model takes 6.
        port.write(b"".join(encode_frame(0, t, [0.5] * 5) for t in range(20)))
        metrics = wait_metrics(textfile, lambda m: metric_sum(
            m, "edgernn_rejected_frames_total") >= 20)
    finally:
        code = daemon.stop()
    assert code == 0
    assert metric_sum(metrics, "edgernn_frames_total") == 0
    assert daemon.records == []
    assert [k for k in metrics if k.startswith("edgernn_rejected_frames_total")] == [
        'edgernn_rejected_frames_total{port="imu",reason="width"}']


@pytest.mark.parametrize("runtime", [
    "ai_edge_litert",
    pytest.param("tflite_runtime", marks=pytest.mark.xfail(
        strict=True, reason="tflite_runtime 2.14 segfaults on a truncated .tflite "
                            "whose sha256 the manifest matches (exit -11)")),
])
def test_truncated_model_matching_manifest_is_refused(runtime, base, tmp_path):
    config, _ = base
    model = tmp_path / "model"
    shutil.copytree(config["model"]["dir"], model)
    truncate_int8(model, update_sha=True)
    config["model"]["dir"] = model
    path = write_config(tmp_path / "edgernnd.toml", config)
    for result in run_both(path, env={"EDGERNN_RUNTIME": runtime}):
        assert_one_line_error(result, RUNTIME_ERROR, "cannot load the model")
