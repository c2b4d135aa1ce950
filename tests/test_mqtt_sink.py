"""Tests of edgernnd.mqtt_sink against a real mosquitto on 127.0.0.1."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mosquitto_broker import (
    MosquittoBroker,
    Subscriber,
    find_mosquitto,
    find_mosquitto_passwd,
    pick_free_port,
)

from edgernnd.config import (
    Config,
    ModelConfig,
    MqttConfig,
    PortConfig,
    PublishConfig,
    SinkKind,
)
from edgernnd.errors import ConfigError
from edgernnd.frames import Prediction
from edgernnd.mqtt_sink import MqttSink, sanitise_topic_level
from edgernnd.publish import DROPPED_METRIC, Publisher
from edgernnd.sinks import make_sink

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="mosquitto is not installed")

_log = logging.getLogger(__name__)

LABELS = ("idle", "walk")
WAIT_S = 10.0
PASSWORD = "s3cr3t-Pa55word"


def make_prediction(seq: int, port: str = "imu0", stream_id: int = 0) -> Prediction:
    return Prediction(port, stream_id, seq, seq * 10, 1.7e9 + seq, "walk",
                      (0.25, 0.75), 1.25)


def make_mqtt_config(broker_port: int, **kwargs) -> MqttConfig:
    kwargs.setdefault("client_id", "edge-1")
    return MqttConfig(host="127.0.0.1", port=broker_port, **kwargs)


def seqs_of(messages, suffix="/prediction"):
    return {json.loads(m.payload)["seq"] for m in messages if m.topic.endswith(suffix)}


class SeqCount:
    """Distinct prediction seqs in a growing message list, parsed once each."""

    def __init__(self):
        self.seen = set()
        self._parsed = 0

    def __call__(self, messages) -> int:
        self.seen |= seqs_of(messages[self._parsed:])
        self._parsed = len(messages)
        return len(self.seen)


class Producer:
    """Publishes predictions with rising seq at about ``rate_hz`` on a thread."""

    def __init__(self, sink, rate_hz: float = 200.0):
        self.sink = sink
        self.period_s = 1.0 / rate_hz
        self.produced = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(WAIT_S)
        return self.produced

    def wait_produced(self, n: int, timeout_s: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.produced >= n, timeout_s)

    def _run(self):
        # Event.wait paces the producer; it is not used to synchronise.
        while not self._stop.wait(self.period_s):
            self.sink.publish(make_prediction(self.produced))
            with self._cond:
                self.produced += 1
                self._cond.notify_all()


class RecordingMetrics:
    def __init__(self):
        self.total = 0

    def inc(self, name, n=1, **labels):
        assert name == DROPPED_METRIC and labels == {"sink": "mqtt"}
        self.total += n


@pytest.fixture
def closing():
    """Closes the sinks a test registers, even when it fails."""
    sinks = []
    yield sinks.append
    for sink in sinks:
        sink.close(timeout_s=2.0)


def test_sanitise_topic_level_replaces_separators_and_wildcards():
    assert sanitise_topic_level("pi-4_b") == "pi-4_b"
    assert sanitise_topic_level("pi.local/#+ é") == "pi_local_____"
    assert sanitise_topic_level("") == "_"


def test_mqtt_sink_publishes_online_and_discovery_retained(mosquitto, closing):
    sink = MqttSink(make_mqtt_config(mosquitto.port), LABELS,
                    streams_hint=[("imu0", 0)])
    closing(sink)
    assert sink.wait_connected(WAIT_S)
    sink.publish(make_prediction(0, stream_id=3))
    assert sink.wait_drained(WAIT_S)

    # Subscribing afterwards: only retained messages can arrive.
    topics = ["edgernn/edge-1/availability", "homeassistant/sensor/+/config"]
    with Subscriber(mosquitto, topics) as sub:
        assert sub.wait_for(lambda ms: len(ms) >= 5, WAIT_S)
        messages = {m.topic: m for m in sub.snapshot()}

    assert all(m.retain for m in messages.values())
    assert messages["edgernn/edge-1/availability"].payload == b"online"
    expected = {f"homeassistant/sensor/edge-1_imu0_{s}_{what}/config"
                for s in (0, 3) for what in ("label", "confidence")}
    assert set(messages) - {"edgernn/edge-1/availability"} == expected

    label = json.loads(messages["homeassistant/sensor/edge-1_imu0_3_label/config"]
                       .payload)
    assert label["state_topic"] == "edgernn/edge-1/imu0/3/prediction"
    assert label["value_template"] == "{{ value_json.label }}"
    assert label["unique_id"] == "edge-1_imu0_3_label"
    assert label["availability_topic"] == "edgernn/edge-1/availability"
    assert label["device"]["identifiers"] == ["edgernn_edge-1"]
    assert label["device"]["model"] == "edgernn"
    assert label["device"]["name"] == "edgernn edge-1"
    confidence = json.loads(
        messages["homeassistant/sensor/edge-1_imu0_0_confidence/config"].payload)
    assert confidence["value_template"] == "{{ value_json.confidence }}"
    assert confidence["unique_id"] != label["unique_id"]


def test_mqtt_sink_without_discovery_sends_no_config(mosquitto, closing):
    sink = MqttSink(make_mqtt_config(mosquitto.port, discovery=False), LABELS)
    closing(sink)
    topics = ["homeassistant/#", "edgernn/#"]
    with Subscriber(mosquitto, topics) as sub:
        sink.publish(make_prediction(0))
        assert sub.wait_for(lambda ms: seqs_of(ms) == {0}, WAIT_S)

    assert not [m for m in sub.snapshot() if m.topic.startswith("homeassistant/")]


def test_mqtt_sink_client_id_defaults_to_sanitised_hostname(mosquitto, closing):
    sink = MqttSink(make_mqtt_config(mosquitto.port, client_id=""), LABELS)
    closing(sink)

    device = sanitise_topic_level(socket.gethostname())
    assert sink.client_id == socket.gethostname()
    assert sink.availability_topic == f"edgernn/{device}/availability"
    assert (sink.prediction_topic("tty/USB0", 2)
            == f"edgernn/{device}/tty_USB0/2/prediction")
    assert sink.wait_connected(WAIT_S)


def test_mqtt_sink_predictions_arrive_with_every_seq(mosquitto, closing):
    sink = MqttSink(make_mqtt_config(mosquitto.port, qos=1), LABELS)
    closing(sink)
    publisher = Publisher(sink, queue_size=10000)
    with Subscriber(mosquitto, ["edgernn/edge-1/+/+/prediction"]) as sub:
        for seq in range(2000):
            publisher.submit(make_prediction(seq, stream_id=seq % 2))
        count = SeqCount()
        assert sub.wait_for(lambda ms: count(ms) >= 2000, WAIT_S)
        messages = sub.snapshot()

    assert publisher.dropped == 0 and sink.dropped == 0
    assert seqs_of(messages) == set(range(2000))
    for m in messages[:10]:
        record = json.loads(m.payload)
        assert m.topic == f"edgernn/edge-1/imu0/{record['seq'] % 2}/prediction"
        assert m.qos == 1
        assert record["scores"] == {"idle": 0.25, "walk": 0.75}
        assert record["label"] == "walk" and record["confidence"] == 0.75


def test_mqtt_sink_close_publishes_offline_retained(mosquitto):
    sink = MqttSink(make_mqtt_config(mosquitto.port), LABELS)
    assert sink.wait_connected(WAIT_S)
    sink.publish(make_prediction(0))
    sink.close(timeout_s=WAIT_S)

    with Subscriber(mosquitto, ["edgernn/edge-1/availability"]) as sub:
        assert sub.wait_for(lambda ms: len(ms) >= 1, WAIT_S)
    message = sub.snapshot()[0]
    assert (message.payload, message.retain) == (b"offline", True)
    assert sink.dropped == 0


def test_mqtt_sink_last_will_says_offline_when_process_killed(mosquitto):
    code = textwrap.dedent(f"""
        import threading
        from edgernnd.config import MqttConfig
        from edgernnd.mqtt_sink import MqttSink
        sink = MqttSink(MqttConfig(port={mosquitto.port}, client_id="edge-will"),
                        ("a", "b"))
        threading.Event().wait()
    """)
    topic = "edgernn/edge-will/availability"
    with Subscriber(mosquitto, [topic]) as sub:
        child = subprocess.Popen([sys.executable, "-c", code],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            came_online = sub.wait_for(
                lambda ms: any(m.payload == b"online" for m in ms), WAIT_S)
            child.send_signal(signal.SIGKILL)
            child.wait(WAIT_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert came_online, child.stderr.read().decode()
        assert sub.wait_for(lambda ms: ms[-1].payload == b"offline", WAIT_S)
    child.stderr.close()

    with Subscriber(mosquitto, [topic]) as late:
        assert late.wait_for(lambda ms: len(ms) >= 1, WAIT_S)
    assert (late.snapshot()[0].payload, late.snapshot()[0].retain) == (b"offline", True)


def test_mqtt_sink_queues_while_broker_down_and_drops_exactly_the_oldest(
    tmp_path, closing
):
    # The subscriber's persistent session outlives the broker's downtime, so the
    # broker keeps what the sink sends for it until it comes back.
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    topics = ["edgernn/edge-1/+/+/prediction"]
    try:
        broker.start()
        with Subscriber(broker, topics, client_id="down-sub", clean_session=False):
            pass
        broker.stop()
        metrics = RecordingMetrics()
        sink = MqttSink(make_mqtt_config(broker.port), LABELS, metrics=metrics,
                        queue_size=100)
        closing(sink)

        slowest_s = 0.0
        for seq in range(1000):
            start = time.perf_counter()
            sink.publish(make_prediction(seq))
            slowest_s = max(slowest_s, time.perf_counter() - start)

        assert slowest_s < 0.05
        assert not sink.connected
        assert sink.dropped == 900 and metrics.total == 900
        assert sink.backlog == 100

        broker.start()
        assert sink.wait_connected(WAIT_S)
        assert sink.wait_drained(WAIT_S)
        with Subscriber(broker, topics, client_id="down-sub",
                        clean_session=False) as sub:
            count = SeqCount()
            assert sub.wait_for(lambda ms: count(ms) >= 100, WAIT_S)
        sink.close(timeout_s=WAIT_S)
    finally:
        broker.close()
    assert seqs_of(sub.snapshot()) == set(range(900, 1000))
    assert sink.dropped == 900


def run_broker_restart(tmp_path, queue_size: int, max_inflight: int = 100):
    """Predictions flow at QoS 1 while the broker is down for about 2 s.

    The subscriber holds a persistent session at a broker with persistence, so
    the broker keeps what it acknowledged for the subscriber across the restart;
    every loss is then the sink's.

    Returns:
        (messages received, predictions produced, sink, figures dict)
    """
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    sink = None
    try:
        broker.start()
        sub = Subscriber(broker, ["edgernn/edge-1/+/+/prediction"],
                         client_id="restart-sub", clean_session=False)
        sub.start()
        sink = MqttSink(make_mqtt_config(broker.port, qos=1), LABELS,
                        queue_size=queue_size, max_inflight=max_inflight)
        assert sink.wait_connected(WAIT_S)
        with Producer(sink, rate_hz=200.0) as producer:
            assert sub.wait_for(lambda ms: len(ms) >= 100, WAIT_S)
            broker.stop()
            stopped_at = time.monotonic()
            stopped_seq = producer.produced
            # About 2 s of predictions while the broker is down.
            assert producer.wait_produced(stopped_seq + 400)
            assert not sink.connected
            broker.start()
            started_at = time.monotonic()
            assert sink.wait_connected(WAIT_S)
            reconnected_at = time.monotonic()
            assert producer.wait_produced(producer.produced + 200)
            produced = producer.stop()
        assert sink.wait_drained(WAIT_S)
        expected = produced - sink.dropped
        count = SeqCount()
        assert sub.wait_for(lambda ms: count(ms) >= expected, WAIT_S)
        messages = sub.snapshot()
        sub.close()
        figures = {
            "produced": produced,
            "dropped": sink.dropped,
            "broker_down_s": round(started_at - stopped_at, 2),
            "reconnect_after_start_s": round(reconnected_at - started_at, 2),
            "outage_s": round(sink.last_outage_s, 2),
            "duplicates": len(messages) - len(seqs_of(messages)),
        }
        _log.info("broker restart (queue_size=%d): %s", queue_size, figures)
        return messages, produced, sink, figures
    finally:
        if sink is not None:
            sink.close(timeout_s=2.0)
        broker.close()


def test_mqtt_sink_broker_restart_loses_nothing_within_bound(tmp_path):
    messages, produced, sink, figures = run_broker_restart(tmp_path, queue_size=10000)

    assert produced >= 600
    assert sink.dropped == 0
    assert seqs_of(messages) == set(range(produced))
    assert sink.disconnects == 1
    assert figures["outage_s"] >= figures["broker_down_s"]


def test_mqtt_sink_broker_restart_tiny_bound_drops_exactly_the_oldest(tmp_path):
    messages, produced, sink, _ = run_broker_restart(
        tmp_path, queue_size=20, max_inflight=10
    )

    missing = sorted(set(range(produced)) - seqs_of(messages))
    assert sink.dropped > 300
    assert len(missing) == sink.dropped
    # One contiguous run: every prediction before it (sent or in flight when the
    # link broke) and after it (the newest 20 kept, then live ones) arrived.
    assert missing == list(range(missing[0], missing[0] + len(missing)))


@pytest.mark.skipif(find_mosquitto_passwd() is None,
                    reason="mosquitto_passwd is not installed")
def test_mqtt_sink_password_file_authenticates_and_is_never_logged(
    tmp_path, caplog, closing
):
    caplog.set_level(logging.DEBUG)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(PASSWORD + "\n")
    with MosquittoBroker(tmp_path / "broker", users={"edge": PASSWORD}) as broker:
        config = make_mqtt_config(broker.port, username="edge",
                                  password_file=password_file)
        sink = MqttSink(config, LABELS)
        closing(sink)
        with Subscriber(broker, ["edgernn/#"], username="edge",
                        password=PASSWORD) as sub:
            sink.publish(make_prediction(42))
            assert sub.wait_for(lambda ms: seqs_of(ms) == {42}, WAIT_S)
        sink.close(timeout_s=WAIT_S)

    # paho's DEBUG lines were captured, so the absence below means something.
    assert "Sending CONNECT" in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.skipif(find_mosquitto_passwd() is None,
                    reason="mosquitto_passwd is not installed")
def test_mqtt_sink_password_from_env_and_refusal_logged_once(
    tmp_path, caplog, monkeypatch, closing
):
    with MosquittoBroker(tmp_path / "broker", users={"edge": PASSWORD}) as broker:
        monkeypatch.setenv("EDGERNN_MQTT_PASSWORD", PASSWORD)
        good = MqttSink(make_mqtt_config(broker.port, username="edge"), LABELS)
        closing(good)
        assert good.wait_connected(WAIT_S)
        good.close(timeout_s=WAIT_S)

        monkeypatch.setenv("EDGERNN_MQTT_PASSWORD", "wrong")
        with caplog.at_level(logging.INFO, logger="edgernnd.mqtt_sink"):
            bad = MqttSink(make_mqtt_config(broker.port, username="edge",
                                            client_id="edge-2"), LABELS)
            closing(bad)
            # Two attempts fit in 1.5 s (backoff starts at 1 s).
            assert not bad.wait_connected(1.5)
            bad.close(timeout_s=WAIT_S)
    refusals = [r for r in caplog.records
                if r.levelno == logging.ERROR and "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert "wrong" not in caplog.text


def test_make_sink_builds_mqtt_sink_with_queue_size(closing):
    config = Config(
        model=ModelConfig(dir=os.getcwd()),
        ports=(PortConfig(url="/dev/ttyUSB0", name="imu0"),),
        publish=PublishConfig(sink=SinkKind.MQTT, queue_size=3),
        mqtt=make_mqtt_config(pick_free_port()),  # nobody listens there
    )
    sink = make_sink(config, LABELS)
    closing(sink)
    for seq in range(5):
        sink.publish(make_prediction(seq))

    assert isinstance(sink, MqttSink)
    assert (sink.dropped, sink.backlog) == (2, 3)


def make_tls_files(directory):
    """A CA and a server certificate for 127.0.0.1 signed by it, made by openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True,
                       capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=edgernn test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1",
        "-extfile", "san.ext")
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is missing")
def test_mqtt_sink_tls_with_ca_file(tmp_path, closing):
    ca, cert, key = make_tls_files(tmp_path)
    with MosquittoBroker(tmp_path / "broker", tls_files=(cert, key)) as broker:
        sink = MqttSink(make_mqtt_config(broker.port, tls_ca_file=ca), LABELS)
        closing(sink)
        assert sink.wait_connected(WAIT_S)
        sink.publish(make_prediction(1))
        assert sink.wait_drained(WAIT_S)
        sink.close(timeout_s=WAIT_S)
    assert sink.dropped == 0


def test_mqtt_sink_unusable_ca_file_is_config_error(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate\n")

    with pytest.raises(ConfigError, match="mqtt.tls_ca_file"):
        MqttSink(make_mqtt_config(pick_free_port(), tls_ca_file=ca), LABELS)


def test_mqtt_sink_password_file_without_username_is_config_error(tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD)

    with pytest.raises(ConfigError, match="mqtt.username"):
        MqttSink(make_mqtt_config(pick_free_port(), password_file=password_file),
                 LABELS)
