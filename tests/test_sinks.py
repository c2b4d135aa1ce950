"""Tests of edgernnd.sinks: JSON lines on stdout and in a file, make_sink."""

import io
import json
import os
import stat
import sys

import pytest

from edgernnd.config import (
    Config,
    ModelConfig,
    PortConfig,
    PublishConfig,
    SinkKind,
)
from edgernnd.errors import ConfigError
from edgernnd.frames import Prediction
from edgernnd.sinks import FileSink, StdoutSink, encode_prediction, make_sink

LABELS = ("idle", "walk", "run")


def make_prediction(seq: int, stream_id: int = 0) -> Prediction:
    return Prediction("imu0", stream_id, seq, 1000 + seq, 1712345678.1234567, "walk",
                      (0.125, 0.75, 0.125), 2.34567)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def make_config(tmp_path, **publish):
    return Config(
        model=ModelConfig(dir=tmp_path),
        ports=(PortConfig(url="/dev/ttyUSB0", name="imu0"),),
        publish=PublishConfig(**publish),
    )


def test_encode_prediction_is_compact_json():
    line = encode_prediction(make_prediction(7), LABELS)

    assert b" " not in line and b"\n" not in line
    assert json.loads(line) == {
        "port": "imu0", "stream": 0, "seq": 7, "sensor_time_ms": 1007,
        "host_time": 1712345678.123457, "label": "walk", "confidence": 0.75,
        "scores": {"idle": 0.125, "walk": 0.75, "run": 0.125},
        "latency_ms": 2.346,
    }


def test_encode_prediction_rejects_nan():
    bad = make_prediction(1)._replace(latency_ms=float("nan"))

    with pytest.raises(ValueError):
        encode_prediction(bad, LABELS)


def test_stdout_sink_writes_one_flushed_line_per_prediction():
    class CountingStream(io.BytesIO):
        flushes_at = []

        def flush(self):
            self.flushes_at.append(self.getvalue().count(b"\n"))
            super().flush()

    stream = CountingStream()
    sink = StdoutSink(LABELS, stream=stream)
    for seq in range(3):
        sink.publish(make_prediction(seq))
    sink.close()

    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2]
    assert stream.flushes_at[:3] == [1, 2, 3]
    assert not stream.closed


def test_stdout_sink_defaults_to_stdout_buffer(monkeypatch):
    stream = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stream))

    StdoutSink(LABELS).publish(make_prediction(4))

    assert json.loads(stream.getvalue())["seq"] == 4


def test_file_sink_creates_0640_file_of_json_lines(tmp_path, umask_022):
    path = tmp_path / "predictions.jsonl"
    sink = FileSink(path, LABELS)
    for seq in range(3):
        sink.publish(make_prediction(seq, stream_id=seq % 2))
    # Flushed per record: the lines are in the file before close.
    lines = path.read_bytes().splitlines()
    sink.close()

    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    records = [json.loads(line) for line in lines]
    assert [(r["seq"], r["stream"]) for r in records] == [(0, 0), (1, 1), (2, 0)]
    assert records[0]["scores"] == {"idle": 0.125, "walk": 0.75, "run": 0.125}


def test_file_sink_appends_to_existing_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(b'{"old":1}\n')
    sink = FileSink(path, LABELS)
    sink.publish(make_prediction(5))
    sink.close()

    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"old":1}'
    assert json.loads(lines[1])["seq"] == 5


def test_file_sink_reopens_after_rotation(tmp_path, umask_022):
    path = tmp_path / "predictions.jsonl"
    rotated = tmp_path / "predictions.jsonl.1"
    sink = FileSink(path, LABELS, reopen_check_s=0.0)
    sink.publish(make_prediction(0))
    path.rename(rotated)

    sink.publish(make_prediction(1))
    sink.close()

    assert [json.loads(x)["seq"] for x in rotated.read_bytes().splitlines()] == [0]
    assert [json.loads(x)["seq"] for x in path.read_bytes().splitlines()] == [1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_file_sink_checks_rotation_at_most_once_per_interval(tmp_path):
    path = tmp_path / "predictions.jsonl"
    rotated = tmp_path / "predictions.jsonl.1"
    sink = FileSink(path, LABELS, reopen_check_s=3600.0)
    path.rename(rotated)

    sink.publish(make_prediction(0))
    sink.close()

    # Within the interval the rotated file still gets the record.
    assert not path.exists()
    assert json.loads(rotated.read_bytes())["seq"] == 0


def test_file_sink_unwritable_path_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="publish.file"):
        FileSink(tmp_path / "missing-dir" / "p.jsonl", LABELS)


def test_make_sink_builds_stdout_and_file_sinks(tmp_path):
    stdout_sink = make_sink(make_config(tmp_path), LABELS)
    file_sink = make_sink(
        make_config(tmp_path, sink=SinkKind.FILE, file=tmp_path / "out.jsonl"), LABELS
    )
    file_sink.close()

    assert isinstance(stdout_sink, StdoutSink)
    assert isinstance(file_sink, FileSink)
    assert file_sink.path == tmp_path / "out.jsonl"


def test_make_sink_mqtt_without_paho_is_config_error(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "edgernnd.mqtt_sink", raising=False)
    for name in [n for n in sys.modules if n == "paho" or n.startswith("paho.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paho", None)  # makes "import paho..." fail

    with pytest.raises(ConfigError, match="paho-mqtt is not installed"):
        make_sink(make_config(tmp_path, sink=SinkKind.MQTT), LABELS)


@pytest.mark.parametrize("seed", range(5))
def test_encode_prediction_equals_json_module_output(seed):
    import random

    rng = random.Random(seed)
    labels = ("Standing", 'quo"te', "ünïcode", "b")
    scores = tuple(rng.randrange(256) / 256 for _ in labels)
    prediction = Prediction(
        port=rng.choice(["pts0", "imu/0", 'we"ird']), stream_id=rng.randrange(65536),
        seq=rng.randrange(65536),
        sensor_time_ms=rng.choice([None, rng.randrange(2**32)]),
        host_time=1.7e9 + rng.random(), label=rng.choice(labels), scores=scores,
        latency_ms=rng.random() * 10)
    expected = json.dumps(prediction.to_json_dict(labels), separators=(",", ":"),
                          allow_nan=False).encode()
    assert encode_prediction(prediction, labels) == expected


def test_publisher_writes_batches_of_lines_in_order():
    from edgernnd.publish import Publisher

    stream = io.BytesIO()
    sink = StdoutSink(("a", "b"), stream=stream)
    publisher = Publisher(sink, queue_size=10_000)
    publisher.submit_many([make_prediction(seq) for seq in range(3000)])
    assert publisher.close(timeout_s=10)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(3000))
    assert publisher.published == 3000 and publisher.dropped == 0
