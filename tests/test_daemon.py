"""edgernnd end to end: real process, pseudo-terminals, the int8 model, systemd.

Frames of real BasicMotions recordings cross a pseudo-terminal into a separate
edgernnd process (which cannot import TensorFlow); its predictions must equal the
int8 model run directly on the same frames, frame for frame and stream by stream.
"""

import signal

import numpy as np
import pytest
from daemon_harness import Daemon, PtyPort, expected_scores

from edgernn.replay import replay
from edgernnd.binary_codec import encode_frame
from edgernnd.csv_codec import encode_csv_line
from edgernnd.manifest import load_manifest

STREAMS = 4
RECORDINGS = 8


@pytest.mark.parametrize("wire_format, runtime", [
    ("binary", "tflite_runtime"), ("csv", "tflite_runtime"),
    ("binary", "ai_edge_litert")])
def test_daemon_predictions_equal_int8_model_frame_for_frame(
        basicmotions_model, basicmotions_test, tmp_path, wire_format, runtime):
    recordings = basicmotions_test.sequences[:RECORDINGS]
    port = PtyPort()
    daemon = Daemon(["--model-dir", str(basicmotions_model), "--port", port.path,
                     "--format", wire_format], tmp_path,
                    env={"EDGERNN_RUNTIME": runtime})
    try:
        daemon.wait_ready()
        result = replay(recordings, basicmotions_test.labels[:RECORDINGS], port.write,
                        wire_format, speed=0, streams=STREAMS)
        records = daemon.wait_records(result.frames)
    finally:
        code = daemon.stop()
        port.close()
    assert code == 0, daemon.stderr_text()

    expected = expected_scores(basicmotions_model, recordings, tmp_path, runtime)
    labels = load_manifest(basicmotions_model).labels
    assert len(records) == result.frames
    per_stream = {}
    for r in records:
        per_stream.setdefault(r["stream"], []).append(r)
    assert sorted(per_stream) == list(range(STREAMS))
    for played in result.played:
        want = expected[played.index]
        got = per_stream[played.stream_id][played.first_frame:played.last_frame + 1]
        assert len(got) == len(want)
        scores = np.array([[r["scores"][k] for k in labels] for r in got])
        np.testing.assert_allclose(scores, want, atol=1e-6)
        assert [r["label"] for r in got] == [labels[i] for i in want.argmax(1)]
    assert {r["port"] for r in records} == {port.path.rsplit("/", 2)[-2] +
                                            port.path.rsplit("/", 1)[-1]}


def test_daemon_notifies_ready_watchdog_status_stopping_in_order(
        basicmotions_model, basicmotions_test, tmp_path):
    port = PtyPort()
    daemon = Daemon(["--model-dir", str(basicmotions_model), "--port", port.path],
                    tmp_path, env={"WATCHDOG_USEC": "400000"})
    try:
        daemon.wait_ready()
        port.write(b"".join(encode_frame(0, t, f) for t, f in
                            enumerate(basicmotions_test.sequences[0])))
        daemon.wait_records(100)
        assert daemon.wait_until(lambda: sum("WATCHDOG=1" in m for m in
                                             daemon.messages) >= 2, 10)
    finally:
        code = daemon.stop(signal.SIGTERM)
        port.close()
    assert code == 0
    kinds = []
    for message in daemon.messages:
        for line in message.split("\n"):
            key = line.split("=", 1)[0]
            if key in ("READY", "WATCHDOG", "STATUS", "STOPPING") and (
                    not kinds or kinds[-1] != key):
                kinds.append(key)
    assert kinds[0] in ("READY", "STATUS")
    first = {k: kinds.index(k) for k in ("READY", "WATCHDOG", "STOPPING")}
    assert first["READY"] < first["WATCHDOG"] < first["STOPPING"]
    assert kinds[-1] == "STOPPING"
    assert "STATUS" in kinds


def test_daemon_survives_bad_input_and_uses_next_good_frame(
        basicmotions_model, basicmotions_test, tmp_path):
    good = basicmotions_test.sequences[0]
    port = PtyPort()
    daemon = Daemon(["--model-dir", str(basicmotions_model), "--port", port.path],
                    tmp_path)
    try:
        daemon.wait_ready()
        bad_crc = bytearray(encode_frame(1, 0, good[0]))
        bad_crc[5] ^= 0x40
        nan_frame = encode_frame(2, 0, np.full(6, np.nan, np.float32))
        wrong_width = encode_frame(3, 0, np.zeros(5, np.float32))
        port.write(b"\xff\x13garbage without delimiter" * 50 + b"\x00"
                   + bytes(bad_crc) + encode_frame(1, 1, good[0])[:9] + b"\x00"
                   + nan_frame + wrong_width)
        port.write(b"".join(encode_frame(0, t, f) for t, f in enumerate(good)))
        records = daemon.wait_records(100)
    finally:
        code = daemon.stop()
        port.close()
    assert code == 0
    assert [r["seq"] for r in records] == list(range(100))
    assert {r["stream"] for r in records} == {0}
    want = expected_scores(basicmotions_model, [good], tmp_path)[0]
    labels = load_manifest(basicmotions_model).labels
    assert [r["label"] for r in records] == [labels[i] for i in want.argmax(1)]


def test_daemon_csv_rejects_wrong_counts_and_keeps_going(
        basicmotions_model, basicmotions_test, tmp_path):
    good = basicmotions_test.sequences[1]
    port = PtyPort()
    daemon = Daemon(["--model-dir", str(basicmotions_model), "--port", port.path,
                     "--format", "csv"], tmp_path)
    try:
        daemon.wait_ready()
        port.write(b"partial,line\n1,2,3\nnot,a,number,x,y,z\n1e400,1,2,3,4,5\n")
        port.write(b"".join(encode_csv_line(f) for f in good))
        records = daemon.wait_records(100)
    finally:
        daemon.stop()
        port.close()
    want = expected_scores(basicmotions_model, [good], tmp_path)[0]
    labels = load_manifest(basicmotions_model).labels
    assert [r["label"] for r in records[-100:]] == [labels[i] for i in want.argmax(1)]
