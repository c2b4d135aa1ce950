"""What edgernnd exposes: listening sockets, secrets in its log, TLS to the
broker, and the modes of the files it writes.

The systemd unit's exposure score is checked in tests/test_systemd_unit.py.
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pytest
from daemon_harness import (
    Daemon,
    PtyPort,
    daemon_config,
    metric_sum,
    wait_metrics,
    write_config,
)
from mosquitto_broker import (
    MosquittoBroker,
    Subscriber,
    find_mosquitto,
    find_mosquitto_passwd,
)
from paho.mqtt.enums import CallbackAPIVersion

from edgernnd.binary_codec import encode_frame

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto is not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl is not installed")

PASSWORD = "Zq8-never-in-logs-7Jx"
CLIENT_ID = "edge-sec"
PREDICTIONS = f"edgernn/{CLIENT_ID}/+/+/prediction"
TCP_LISTEN = "0A"
WAIT_S = 20.0


def frames(count: int, stream: int = 0) -> bytes:
    return b"".join(encode_frame(stream, t, [0.1 * t] * 6) for t in range(count))


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def decode_address(hex_address: str) -> tuple[ipaddress._BaseAddress, int]:
    """An address of /proc/net/{tcp,udp}{,6}: host words in host byte order."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # Each 32-bit word is printed as a little-endian number.
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(swapped), int(port, 16)


def inet_sockets(pid: int) -> list[tuple]:
    """(table, state, local address, local port, remote port) of the process's IP
    sockets."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = open(f"/proc/net/{table}").read().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for line in lines:
            fields = line.split()
            if int(fields[9]) in inodes:
                address, port = decode_address(fields[1])
                found.append((table, fields[3], address, port,
                              decode_address(fields[2])[1]))
    return found


def metrics_url(daemon) -> str:
    assert daemon.wait_stderr("serving metrics on http://")
    line = next(x for x in daemon.stderr_lines if "serving metrics on" in x)
    return re.search(r"(http://\S+/metrics)", line).group(1)


def scrape_until(url: str, text: str, timeout_s: float = WAIT_S) -> str:
    """GETs the metrics page until it contains ``text``; the last page."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            page = response.read().decode()
        if text in page or time.monotonic() > deadline:
            return page
        time.sleep(0.05)  # a scrape interval, not a synchronisation


@needs_mosquitto
def test_daemon_listens_only_on_loopback_metrics(basicmotions_model, tmp_path,
                                                 mosquitto):
    port = PtyPort()
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        basicmotions_model, {"imu": port.path},
        publish={"sink": "mqtt"},
        mqtt={"port": mosquitto.port, "client_id": CLIENT_ID},
        metrics={"listen": "127.0.0.1:0"}))
    daemon = Daemon(["--config", str(config)], tmp_path)
    try:
        daemon.wait_ready()
        url = metrics_url(daemon)
        assert daemon.wait_stderr("connected to MQTT broker")
        port.write(frames(10))
        page = scrape_until(url, 'edgernn_frames_total{port="imu"} 10')
        sockets = inet_sockets(daemon.pid)
    finally:
        code = daemon.stop()
        port.close()
    assert code == 0

    listening = [s[:4] for s in sockets
                 if s[0].startswith("tcp") and s[1] == TCP_LISTEN]
    metrics_port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert listening == [("tcp", TCP_LISTEN, ipaddress.ip_address("127.0.0.1"),
                          metrics_port)]
    assert not [s for s in sockets if s[0].startswith("udp")]
    # The rest are connections: to the broker, and paho's wake-up socket pair
    # (TCP over loopback); every one of them on a loopback address.
    assert all(s[2].is_loopback for s in sockets), sockets
    assert any(s[4] == mosquitto.port for s in sockets), sockets
    assert "edgernn_up 1" in page
    assert 'edgernn_frames_total{port="imu"} 10' in page
    assert daemon.count_stderr("Traceback") == 0


def test_daemon_without_listen_has_no_listening_socket(basicmotions_model, tmp_path):
    port = PtyPort()
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        basicmotions_model, {"imu": port.path}))
    daemon = Daemon(["--config", str(config)], tmp_path)
    try:
        daemon.wait_ready()
        port.write(frames(5))
        daemon.wait_records(5)
        sockets = inet_sockets(daemon.pid)
    finally:
        assert daemon.stop() == 0
        port.close()
    assert sockets == []


@needs_mosquitto
@pytest.mark.skipif(find_mosquitto_passwd() is None,
                    reason="mosquitto_passwd is not installed")
@pytest.mark.parametrize("source", ["password_file", "environment"])
def test_mqtt_password_is_never_logged(basicmotions_model, tmp_path, source):
    port = PtyPort()
    mqtt_section = {"client_id": CLIENT_ID, "username": "edge"}
    env = {}
    if source == "password_file":
        secret = tmp_path / "mqtt-password"
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
        mqtt_section["password_file"] = secret
    else:
        env["EDGERNN_MQTT_PASSWORD"] = PASSWORD
    with MosquittoBroker(tmp_path / "broker", users={"edge": PASSWORD}) as broker:
        mqtt_section["port"] = broker.port
        config = write_config(tmp_path / "edgernnd.toml", daemon_config(
            basicmotions_model, {"imu": port.path}, publish={"sink": "mqtt"},
            mqtt=mqtt_section))
        with Subscriber(broker, [PREDICTIONS], username="edge",
                        password=PASSWORD) as sub:
            daemon = Daemon(["--config", str(config), "--log-level", "debug"],
                            tmp_path, env=env)
            try:
                daemon.wait_ready()
                port.write(frames(5))
                delivered = sub.wait_for(lambda ms: len(ms) >= 5, WAIT_S)
            finally:
                code = daemon.stop()
                port.close()
    assert code == 0
    assert delivered, daemon.stderr_text()
    log = daemon.stderr_text()
    # paho's own DEBUG lines are in the log, so the absence means something.
    assert "Sending CONNECT" in log and "Sending PUBLISH" in log
    assert PASSWORD not in log
    assert PASSWORD[:8] not in log and PASSWORD[-8:] not in log


def make_ca_and_server_cert(directory, name: str = "ca") -> tuple:
    """A fresh CA and a certificate for 127.0.0.1 it signed (EC P-256, 1 day)."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True,
                       capture_output=True, timeout=30)

    key_args = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key_args, "-keyout", f"{name}.key", "-out",
            f"{name}.crt", "-days", "1", "-subj", f"/CN=edgernn {name}")
    openssl("req", *key_args, "-keyout", f"{name}-server.key", "-out",
            f"{name}-server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ip-san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}.crt",
            "-CAkey", f"{name}.key", "-CAcreateserial", "-days", "1",
            "-out", f"{name}-server.crt", "-extfile", "ip-san.cnf")
    return (directory / f"{name}.crt", directory / f"{name}-server.crt",
            directory / f"{name}-server.key")


class TlsSubscriber:
    """A paho client over TLS that keeps the payloads of one topic filter."""

    def __init__(self, port: int, ca_file, topic: str):
        self.payloads: list[bytes] = []
        self.subscribed = threading.Event()
        self.cond = threading.Condition()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"tls-sub-{uuid.uuid4().hex[:6]}")
        self.client.tls_set(ca_certs=str(ca_file))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.payloads.append(message.payload)
            self.cond.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.payloads) >= count, timeout_s)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@needs_mosquitto
@needs_openssl
def test_mqtt_tls_with_ca_file(basicmotions_model, tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    other_ca, _, _ = make_ca_and_server_cert(tmp_path, "other")
    port = PtyPort()
    with MosquittoBroker(tmp_path / "broker", tls_files=(cert, key)) as broker:
        sub = TlsSubscriber(broker.port, ca, PREDICTIONS)
        try:
            assert sub.subscribed.wait(WAIT_S)
            results = {}
            for name, ca_file in (("trusted", ca), ("untrusted", other_ca)):
                config = write_config(tmp_path / f"{name}.toml", daemon_config(
                    basicmotions_model, {"imu": port.path}, publish={"sink": "mqtt"},
                    mqtt={"port": broker.port, "client_id": CLIENT_ID,
                          "tls_ca_file": ca_file}))
                daemon = Daemon(["--config", str(config)], tmp_path)
                try:
                    daemon.wait_ready()
                    if name == "trusted":
                        assert daemon.wait_stderr("connected to MQTT broker")
                        port.write(frames(5))
                        results[name] = sub.wait_for(5, WAIT_S)
                    else:
                        assert daemon.wait_stderr("cannot reach MQTT broker")
                        port.write(frames(5, stream=1))
                        results[name] = sub.wait_for(6, 2.0)
                finally:
                    assert daemon.stop() == 0
                results[name + "_log"] = daemon.stderr_text()
        finally:
            sub.close()
            port.close()
    assert results["trusted"], results["trusted_log"]
    assert not results["untrusted"]
    assert "connected to MQTT broker" not in results["untrusted_log"]
    records = [json.loads(p) for p in sub.payloads]
    assert sorted(r["seq"] for r in records) == list(range(5))
    assert {r["stream"] for r in records} == {0}


def test_written_files_are_not_world_readable(basicmotions_model, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    textfile = tmp_path / "edgernnd.prom"
    predictions = tmp_path / "predictions.jsonl"
    port = PtyPort()
    config = write_config(tmp_path / "edgernnd.toml", daemon_config(
        basicmotions_model, {"imu": port.path},
        state={"dir": state_dir, "snapshot_interval_s": 0.2},
        publish={"sink": "file", "file": predictions},
        metrics={"textfile": textfile, "interval_s": 0.2}))
    # umask 0: the modes below are the daemon's own choice, not the umask's.
    daemon = Daemon(["--config", str(config)], tmp_path, umask=0)
    try:
        daemon.wait_ready()
        port.write(frames(20))
        wait_metrics(textfile, lambda m: metric_sum(m, "edgernn_predictions_total")
                     == 20)
        running = {p.name: p.stat().st_mode & 0o777 for p in
                   (state_dir / "states.npz", textfile, predictions)}
    finally:
        code = daemon.stop()
        port.close()
    assert code == 0
    after = {p.name: p.stat().st_mode & 0o777 for p in
             (state_dir / "states.npz", textfile, predictions)}
    assert running == after == {"states.npz": 0o600, "edgernnd.prom": 0o640,
                                "predictions.jsonl": 0o640}
    assert predictions.read_text().count("\n") == 20
    leftovers = [p.name for p in (*state_dir.iterdir(), *tmp_path.iterdir())
                 if p.name.endswith(".tmp")]
    assert leftovers == []
