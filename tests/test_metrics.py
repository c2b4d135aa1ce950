"""Tests of edgernnd.metrics: exposition text, textfile, HTTP listener."""

from __future__ import annotations

import math
import os
import re
import socket
import stat
import urllib.error
import urllib.request

import pytest

from edgernnd import metrics as metrics_module
from edgernnd.metrics import INVOKE_WINDOW, Metrics

HTTP_TIMEOUT_S = 5.0

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_exposition(text: str) -> tuple[dict, dict, dict]:
    """Parses Prometheus text format 0.0.4 strictly enough to catch mistakes.

    Returns:
        (samples, types, helps): samples maps (name, frozenset of label pairs)
        to a float; types and helps map a metric name to its TYPE and HELP.
    """
    samples: dict = {}
    types: dict = {}
    helps: dict = {}
    assert text.endswith("\n"), "exposition must end with a newline"
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps, f"second HELP for {name}"
            helps[name] = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped")
            assert name not in types, f"second TYPE for {name}"
            types[name] = kind
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, label_text, value_text = match.groups()
        labels = parse_labels(label_text[1:-1]) if label_text else {}
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate series {key}"
        samples[key] = float(value_text)
    return samples, types, helps


def parse_labels(text: str) -> dict[str, str]:
    labels = {}
    pos = 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad label text at {text[pos:]!r}"
        raw = match.group(2)
        value = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), raw)
        labels[match.group(1)] = value
        pos = match.end()
    return labels


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_render_parses_to_recorded_values():
    m = Metrics()
    for _ in range(3):
        m.inc("edgernn_frames_total", port="imu0")
    m.inc("edgernn_frames_total", 40, port="imu1")
    m.inc("edgernn_rejected_frames_total", port="imu0", reason="range")
    m.inc("edgernn_rejected_frames_total", 2, reason="range", port="imu0")
    m.inc("edgernn_crc_errors_total", 5, port="imu1")
    m.inc("edgernn_state_resets_total", reason="idle")
    m.inc("edgernn_predictions_total", 7)
    m.inc("edgernn_predictions_dropped_total", sink="mqtt")
    m.set_gauge("edgernn_streams", 8)
    m.set_gauge("edgernn_up", 1)
    for i in range(1, 101):
        m.observe_invoke(i / 1000)

    samples, types, helps = parse_exposition(m.render())

    assert sample(samples, "edgernn_frames_total", port="imu0") == 3
    assert sample(samples, "edgernn_frames_total", port="imu1") == 40
    # The same labels given in another keyword order are one series.
    assert sample(samples, "edgernn_rejected_frames_total", port="imu0",
                  reason="range") == 3
    assert sample(samples, "edgernn_crc_errors_total", port="imu1") == 5
    assert sample(samples, "edgernn_state_resets_total", reason="idle") == 1
    assert sample(samples, "edgernn_predictions_total") == 7
    assert sample(samples, "edgernn_predictions_dropped_total", sink="mqtt") == 1
    assert sample(samples, "edgernn_streams") == 8
    assert sample(samples, "edgernn_up") == 1
    assert sample(samples, "edgernn_invoke_seconds", quantile="0.5") == 0.05
    assert sample(samples, "edgernn_invoke_seconds", quantile="0.99") == 0.099
    assert sample(samples, "edgernn_invoke_seconds_sum") == pytest.approx(5.05)
    assert sample(samples, "edgernn_invoke_seconds_count") == 100
    assert types["edgernn_frames_total"] == "counter"
    assert types["edgernn_streams"] == "gauge"
    assert types["edgernn_invoke_seconds"] == "summary"
    assert set(helps) == set(types)
    # Labelled counters never incremented render no sample.
    assert not [k for k in samples if k[0] == "edgernn_seq_gaps_total"]


def test_metrics_render_fresh_registry_has_all_names():
    samples, types, _ = parse_exposition(Metrics().render())

    assert set(types) == {
        "edgernn_frames_total", "edgernn_rejected_frames_total",
        "edgernn_crc_errors_total", "edgernn_seq_gaps_total",
        "edgernn_state_resets_total", "edgernn_reconnects_total",
        "edgernn_predictions_total", "edgernn_predictions_dropped_total",
        "edgernn_invoke_seconds", "edgernn_streams", "edgernn_up",
    }
    assert sample(samples, "edgernn_predictions_total") == 0
    assert sample(samples, "edgernn_up") == 0
    assert math.isnan(sample(samples, "edgernn_invoke_seconds", quantile="0.5"))
    assert sample(samples, "edgernn_invoke_seconds_count") == 0


def test_metrics_render_escapes_label_values():
    m = Metrics()
    awkward = 'ser2net "lab"\\bench\nB'
    m.inc("edgernn_reconnects_total", port=awkward)

    samples, _, _ = parse_exposition(m.render())

    assert sample(samples, "edgernn_reconnects_total", port=awkward) == 1


def test_metrics_declare_allows_custom_metrics():
    m = Metrics()
    m.declare("edgernn_snapshots_total", "counter", "State snapshots written.")
    m.declare("edgernn_queue_depth", "gauge", "Predictions waiting, per sink.",
              label_names=("sink",))
    m.declare("edgernn_idle_streams", "gauge", "Streams silent, per port.",
              label_names=("port",))
    m.inc("edgernn_snapshots_total", 2)
    m.set_gauge("edgernn_queue_depth", 12.5, sink="mqtt")

    samples, types, helps = parse_exposition(m.render())

    assert types["edgernn_idle_streams"] == "gauge"
    assert not [k for k in samples if k[0] == "edgernn_idle_streams"]

    assert sample(samples, "edgernn_snapshots_total") == 2
    assert sample(samples, "edgernn_queue_depth", sink="mqtt") == 12.5
    assert types["edgernn_queue_depth"] == "gauge"
    assert helps["edgernn_snapshots_total"] == "State snapshots written."


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.inc("edgernn_nonsense_total"), "declare it first"),
        (lambda m: m.inc("edgernn_up"), "is a gauge, not a counter"),
        (lambda m: m.set_gauge("edgernn_frames_total", 1), "is a counter"),
        (lambda m: m.declare("edgernn_up", "gauge", "x"), "already declared"),
        (lambda m: m.declare("edgernn_invoke_seconds", "gauge", "x"), "already"),
        (lambda m: m.declare("2fast", "gauge", "x"), "metric name"),
        (lambda m: m.declare("edgernn_x", "histogram", "x"), "kind"),
    ],
)
def test_metrics_misuse_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(Metrics())


def test_metrics_invoke_quantiles_cover_recent_window():
    m = Metrics()
    for _ in range(500):
        m.observe_invoke(1.0)
    for _ in range(INVOKE_WINDOW):
        m.observe_invoke(0.002)

    samples, _, _ = parse_exposition(m.render())

    # The slow invokes fell out of the window; count and sum keep them.
    assert sample(samples, "edgernn_invoke_seconds", quantile="0.99") == 0.002
    assert sample(samples, "edgernn_invoke_seconds_count") == 500 + INVOKE_WINDOW
    assert sample(samples, "edgernn_invoke_seconds_sum") == pytest.approx(
        500 + 0.002 * INVOKE_WINDOW
    )


def test_metrics_status_line_summarises():
    m = Metrics()
    m.set_gauge("edgernn_streams", 8)
    m.inc("edgernn_crc_errors_total", 2, port="a")
    m.inc("edgernn_rejected_frames_total", 1, port="b", reason="range")
    m.inc("edgernn_seq_gaps_total", 9, port="a")
    for seconds in (0.000011, 0.000012, 0.000013):
        m.observe_invoke(seconds)

    line = m.status_line(412.34)

    assert line == "412.3 frames/s, 8 streams, 3 errors, invoke p50 0.012 ms"
    assert Metrics().status_line(0.0) == (
        "0.0 frames/s, 0 streams, 0 errors, invoke p50 -"
    )


def test_metrics_write_textfile_replaces_atomically(tmp_path):
    m = Metrics()
    m.inc("edgernn_frames_total", 3, port="imu0")
    target = tmp_path / "edgernnd.prom"
    target.write_text("old\n")
    reader = open(target)  # a scraper that opened the previous version

    m.write_textfile(target)

    assert os.listdir(tmp_path) == ["edgernnd.prom"]
    assert target.read_text() == m.render()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert reader.read() == "old\n"
    reader.close()


def test_metrics_write_textfile_failure_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "edgernnd.prom"
    target.write_text("old\n")

    def fail_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(metrics_module.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="Input/output"):
        Metrics().write_textfile(target)

    assert os.listdir(tmp_path) == ["edgernnd.prom"]
    assert target.read_text() == "old\n"


def test_metrics_write_textfile_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Metrics().write_textfile(tmp_path / "absent" / "edgernnd.prom")


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return (response.status, response.headers["Content-Type"],
                    response.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], ""


def test_metrics_serve_http_answers_on_loopback():
    m = Metrics()
    m.inc("edgernn_frames_total", 11, port="imu0")
    server = m.serve_http("127.0.0.1", 0)
    try:
        assert server.port > 0
        status, content_type, body = fetch(server.url)
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        samples, _, _ = parse_exposition(body)
        assert sample(samples, "edgernn_frames_total", port="imu0") == 11

        m.inc("edgernn_frames_total", port="imu0")
        samples, _, _ = parse_exposition(fetch(server.url)[2])
        assert sample(samples, "edgernn_frames_total", port="imu0") == 12

        status, _, _ = fetch(f"http://127.0.0.1:{server.port}/")
        assert status == 404
    finally:
        server.close()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT_S)


def test_metrics_serve_http_answers_on_ipv6_loopback():
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = Metrics().serve_http("::1", 0)
    try:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert fetch(server.url)[0] == 200
    finally:
        server.close()


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "", "example.com"]
)
def test_metrics_serve_http_refuses_non_loopback(host):
    with pytest.raises(ValueError, match="loopback|IP address"):
        Metrics().serve_http(host, 0)


def test_metrics_listen_host_allow_remote_accepts_any_address():
    # Only the check: binding every interface is not done in tests.
    check = metrics_module._check_listen_host
    assert check("0.0.0.0", allow_remote=True) == "0.0.0.0"
    assert check("localhost", allow_remote=False) == "127.0.0.1"
    with pytest.raises(ValueError, match="IP address"):
        check("example.com", allow_remote=True)
