"""Restarts of edgernnd: state snapshots on SIGTERM and periodically, SIGKILL, and
snapshots that must not be used (another model, damaged, unwritable directory).

The reference for "resumed correctly" is the int8 model run directly on a whole
recording, which tests/test_daemon.py shows equals a daemon that never stopped.
"""

import json
import signal
import socket
import threading
import time

import numpy as np
import pytest
from daemon_harness import (
    Daemon,
    PtyPort,
    daemon_config,
    expected_scores,
    scores_of,
    write_config,
)

from edgernnd.binary_codec import encode_frame
from edgernnd.manifest import load_manifest

STREAMS = 4
HALF = 50
SNAPSHOT_INTERVAL_S = 0.5
# A periodic snapshot is due every interval; it is taken when the main loop next
# comes round (within a frame's time here) and costs a write and an fsync.
SNAPSHOT_SLACK_S = 0.5
FRAME_PERIOD_S = 0.02  # each stream at 50 frames/s in the SIGKILL test


@pytest.fixture(scope="module")
def recordings(basicmotions_test):
    return [np.asarray(s, np.float32) for s in basicmotions_test.sequences[:STREAMS]]


@pytest.fixture(scope="module")
def expected(basicmotions_model, recordings, tmp_path_factory):
    """Scores of whole recordings, and of their second halves from a zero state."""
    tmp = tmp_path_factory.mktemp("expected")
    whole = expected_scores(basicmotions_model, recordings, tmp)
    fresh = expected_scores(basicmotions_model, [r[HALF:] for r in recordings], tmp)
    return whole, fresh


def frames_bytes(recordings, first: int, last: int, streams=range(STREAMS)) -> bytes:
    """Frames first..last-1 of each stream, interleaved, seq = frame index."""
    return b"".join(encode_frame(s, t, recordings[s][t])
                    for t in range(first, last) for s in streams)


def by_stream(records) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(r["stream"], []).append(r)
    return out


def write_daemon_config(tmp_path, model, port, state_dir, **sections) -> str:
    """The configuration file; ``state_dir`` None leaves state.dir unset."""
    state = sections.pop("state", {})
    if state_dir is not None:
        state["dir"] = state_dir
    path = write_config(tmp_path / "edgernnd.toml", daemon_config(
        model, {"imu": port.path}, state=state, **sections))
    return str(path)


def read_snapshot_meta(state_dir) -> dict:
    with np.load(state_dir / "states.npz") as data:
        return json.loads(bytes(data["meta"]).decode())


@pytest.mark.parametrize("state_dir_from", ["config", "flag"])
def test_restart_after_sigterm_continues_like_an_uninterrupted_run(
        basicmotions_model, recordings, expected, tmp_path, state_dir_from):
    whole, fresh = expected
    labels = load_manifest(basicmotions_model).labels
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    port = PtyPort()
    args = ["--config", write_daemon_config(
        tmp_path, basicmotions_model, port,
        state_dir if state_dir_from == "config" else None)]
    if state_dir_from == "flag":
        args += ["--state-dir", str(state_dir)]
    try:
        first = Daemon(args, tmp_path)
        try:
            first.wait_ready()
            port.write(frames_bytes(recordings, 0, HALF))
            first_records = first.wait_records(STREAMS * HALF)
        finally:
            first_code = first.stop(signal.SIGTERM)
        snapshot_mode = (state_dir / "states.npz").stat().st_mode & 0o777

        second = Daemon(args, tmp_path)
        try:
            second.wait_ready()
            port.write(frames_bytes(recordings, HALF, 2 * HALF))
            second_records = second.wait_records(STREAMS * HALF)
        finally:
            second_code = second.stop(signal.SIGTERM)
    finally:
        port.close()

    assert (first_code, second_code) == (0, 0), second.stderr_text()
    assert snapshot_mode == 0o600
    assert second.count_stderr(f"restored the state of {STREAMS} streams") == 1
    before, after = by_stream(first_records), by_stream(second_records)
    for s in range(STREAMS):
        np.testing.assert_allclose(scores_of(before[s], labels), whole[s][:HALF],
                                   atol=1e-6)
        assert [r["seq"] for r in after[s]] == list(range(HALF, 2 * HALF))
        np.testing.assert_allclose(scores_of(after[s], labels), whole[s][HALF:],
                                   atol=1e-6)
    # The check above can fail: a daemon that forgot the state would give these.
    assert any(not np.allclose(fresh[s], whole[s][HALF:], atol=1e-3)
               for s in range(STREAMS))


class PacedWriter(threading.Thread):
    """Writes frame t of every stream each FRAME_PERIOD_S until stopped."""

    def __init__(self, port, recordings):
        super().__init__(daemon=True)
        self.port, self.recordings = port, recordings
        self.stopping = threading.Event()

    def run(self):
        start = time.monotonic()
        for t in range(len(self.recordings[0])):
            if self.stopping.wait(max(0.0, start + t * FRAME_PERIOD_S
                                      - time.monotonic())):
                return
            self.port.write(frames_bytes(self.recordings, t, t + 1))


def test_restart_after_sigkill_loses_at_most_the_snapshot_interval(
        basicmotions_model, recordings, expected, tmp_path):
    whole, _ = expected
    labels = load_manifest(basicmotions_model).labels
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    port = PtyPort()
    config = write_daemon_config(tmp_path, basicmotions_model, port, state_dir,
                                 state={"snapshot_interval_s": SNAPSHOT_INTERVAL_S})
    try:
        killed = Daemon(["--config", config], tmp_path)
        writer = PacedWriter(port, recordings)
        try:
            killed.wait_ready()
            writer.start()
            # About 1.2 s of frames: two snapshots at least.
            killed.wait_records(STREAMS * 60)
            killed_at = time.time()
            killed.process.send_signal(signal.SIGKILL)
        finally:
            writer.stopping.set()
            writer.join()
            killed_code = killed.stop()
        meta = read_snapshot_meta(state_dir)
        last_seq = {s: recs[-1]["seq"] for s, recs in by_stream(killed.records).items()}
        snap_seq = {sid: seq for (_, sid), seq in zip(meta["keys"], meta["seq"])}

        # The sensor sends again from the snapshot on, as if it had buffered.
        resumed = Daemon(["--config", config], tmp_path)
        try:
            resumed.wait_ready()
            for s in range(STREAMS):
                port.write(b"".join(encode_frame(s, t, recordings[s][t])
                                    for t in range(snap_seq[s] + 1, 100)))
            records = resumed.wait_records(sum(99 - snap_seq[s] for s in snap_seq))
        finally:
            resumed_code = resumed.stop()
    finally:
        port.close()

    assert killed_code == -signal.SIGKILL
    assert resumed_code == 0, resumed.stderr_text()
    age_s = killed_at - meta["time"]
    assert 0 <= age_s <= SNAPSHOT_INTERVAL_S + SNAPSHOT_SLACK_S
    assert sorted(snap_seq) == list(range(STREAMS))
    lost_bound = int((SNAPSHOT_INTERVAL_S + SNAPSHOT_SLACK_S) / FRAME_PERIOD_S) + 1
    for s in range(STREAMS):
        assert 0 <= last_seq[s] - snap_seq[s] <= lost_bound
    assert resumed.count_stderr(f"restored the state of {STREAMS} streams") == 1
    after = by_stream(records)
    for s in range(STREAMS):
        assert [r["seq"] for r in after[s]] == list(range(snap_seq[s] + 1, 100))
        np.testing.assert_allclose(scores_of(after[s], labels),
                                   whole[s][snap_seq[s] + 1:], atol=1e-6)


@pytest.fixture(scope="module")
def valid_snapshot(basicmotions_model, recordings, tmp_path_factory) -> bytes:
    """The bytes of a snapshot taken after the first halves of the recordings."""
    tmp = tmp_path_factory.mktemp("snapshot")
    state_dir = tmp / "state"
    state_dir.mkdir()
    port = PtyPort()
    config = write_daemon_config(tmp, basicmotions_model, port, state_dir)
    daemon = Daemon(["--config", config], tmp)
    try:
        daemon.wait_ready()
        port.write(frames_bytes(recordings, 0, HALF))
        daemon.wait_records(STREAMS * HALF)
    finally:
        assert daemon.stop() == 0
        port.close()
    return (state_dir / "states.npz").read_bytes()


def rewrite_meta(data: bytes, tmp_path, **changes) -> bytes:
    source = tmp_path / "source.npz"
    source.write_bytes(data)
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta.update(changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    target = tmp_path / "target.npz"
    np.savez(target, **arrays)
    return target.read_bytes()


def flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + \
        data[middle + 64:]


BAD_SNAPSHOTS = {
    # name: (how to damage the good bytes, what the WARNING says)
    "other_model": (lambda d, tmp: rewrite_meta(d, tmp, model_sha256="0" * 64),
                    "taken with another model"),
    "other_format": (lambda d, tmp: rewrite_meta(d, tmp, format=99), "format 99"),
    "truncated": (lambda d, tmp: d[:len(d) // 2], "unreadable"),
    "corrupt": (lambda d, tmp: flip_middle(d), "unreadable"),
    "empty": (lambda d, tmp: b"", "unreadable"),
    "not_a_zip": (lambda d, tmp: b"states of mind\n" * 10, "unreadable"),
    "seq_not_a_number": (lambda d, tmp: rewrite_meta(d, tmp, seq=["x"] * STREAMS),
                         "unreadable"),
    "keys_missing": (lambda d, tmp: rewrite_meta(d, tmp, keys=None), "unreadable"),
}


@pytest.mark.parametrize("damage", sorted(BAD_SNAPSHOTS) + ["directory"])
def test_restart_ignores_unusable_snapshot_with_warning(
        basicmotions_model, recordings, expected, valid_snapshot, tmp_path, damage):
    _, fresh = expected
    labels = load_manifest(basicmotions_model).labels
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    snapshot = state_dir / "states.npz"
    if damage == "directory":
        snapshot.mkdir()
        warning = "unreadable"
    else:
        make, warning = BAD_SNAPSHOTS[damage]
        snapshot.write_bytes(make(valid_snapshot, tmp_path))
    port = PtyPort()
    config = write_daemon_config(tmp_path, basicmotions_model, port, state_dir)
    daemon = Daemon(["--config", config], tmp_path)
    try:
        daemon.wait_ready()
        port.write(frames_bytes(recordings, HALF, 2 * HALF))
        records = daemon.wait_records(STREAMS * HALF)
    finally:
        code = daemon.stop(signal.SIGTERM)
        port.close()

    assert code == 0, daemon.stderr_text()
    assert "Traceback" not in daemon.stderr_text()
    warnings = [line for line in daemon.stderr_lines
                if " WARNING " in line and "not restored" in line]
    assert len(warnings) == 1 and warning in warnings[0], daemon.stderr_text()
    streams = by_stream(records)
    for s in range(STREAMS):
        np.testing.assert_allclose(scores_of(streams[s], labels), fresh[s], atol=1e-6)
    if damage == "directory":
        assert daemon.count_stderr("cannot write state snapshot") == 1
    else:
        # The shutdown snapshot replaced the damaged one with a usable one.
        assert read_snapshot_meta(state_dir)["seq"] == [2 * HALF - 1] * STREAMS


@pytest.mark.parametrize("kind", ["cannot_be_created", "regular_file"])
def test_unwritable_state_dir_warns_once_and_keeps_running(
        basicmotions_model, recordings, expected, tmp_path, kind):
    _, fresh = expected
    labels = load_manifest(basicmotions_model).labels
    state_dir = tmp_path / "state"
    if kind == "regular_file":
        state_dir.write_text("not a directory\n")
    else:  # a missing folder is created at start, unless a file is in the way
        (tmp_path / "blocked").write_text("a file, not a folder\n")
        state_dir = tmp_path / "blocked" / "state"
    port = PtyPort()
    config = write_daemon_config(tmp_path, basicmotions_model, port, state_dir,
                                 state={"snapshot_interval_s": 0.1})
    daemon = Daemon(["--config", config, "--log-level", "debug"], tmp_path)
    try:
        daemon.wait_ready()
        port.write(frames_bytes(recordings, HALF, 2 * HALF))
        records = daemon.wait_records(STREAMS * HALF)
        # Five periodic snapshots failed (the repeats are logged at DEBUG).
        assert daemon.wait_stderr("cannot write state snapshot", count=5)
    finally:
        code = daemon.stop(signal.SIGTERM)
        port.close()

    assert code == 0, daemon.stderr_text()
    warnings = [line for line in daemon.stderr_lines
                if " WARNING " in line and "cannot write state snapshot" in line]
    # The first failure, and the final snapshot at shutdown (state is lost).
    assert len(warnings) == 2, daemon.stderr_text()
    assert str(state_dir) in warnings[0]
    streams = by_stream(records)
    for s in range(STREAMS):
        np.testing.assert_allclose(scores_of(streams[s], labels), fresh[s], atol=1e-6)


def test_failed_start_leaves_the_snapshot_alone(
        basicmotions_model, valid_snapshot, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "states.npz").write_bytes(valid_snapshot)
    port = PtyPort()
    with socket.socket() as taken:  # metrics.listen cannot bind: start fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write_daemon_config(tmp_path, basicmotions_model, port, state_dir,
                                     metrics={"listen": listen})
        daemon = Daemon(["--config", config], tmp_path)
        try:
            code = daemon.process.wait(timeout=30)
        finally:
            daemon.stop()
            port.close()
    assert code == 2
    assert daemon.stderr_lines[-1] == (
        f"edgernnd: error: metrics.listen {listen!r} cannot be served: "
        "[Errno 98] Address already in use")
    assert "Traceback" not in daemon.stderr_text()
    assert (state_dir / "states.npz").read_bytes() == valid_snapshot


def test_missing_state_dir_is_created_and_snapshot_written(basicmotions_model,
                                                           recordings, tmp_path):
    state_dir = tmp_path / "new" / "state"
    port = PtyPort()
    config = write_daemon_config(tmp_path, basicmotions_model, port, state_dir)
    daemon = Daemon(["--config", config], tmp_path)
    try:
        daemon.wait_ready()
        port.write(frames_bytes(recordings, 0, HALF))
        daemon.wait_records(STREAMS * HALF)
    finally:
        code = daemon.stop(signal.SIGTERM)
        port.close()
    assert code == 0, daemon.stderr_text()
    assert read_snapshot_meta(state_dir)["seq"] == [HALF - 1] * STREAMS
    assert (state_dir.stat().st_mode & 0o777) == 0o750
