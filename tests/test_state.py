"""Per-stream state: staggered bounded history, resets, snapshots (real int8 model)."""

import numpy as np
import pytest

from edgernn.convert import host_runtime
from edgernnd.manifest import load_manifest
from edgernnd.runner import StepRunner
from edgernnd.state import StreamStates


@pytest.fixture(scope="module")
def runner(basicmotions_model):
    return StepRunner(load_manifest(basicmotions_model), "int8", host_runtime())


def _stream_of(test, frames):
    return np.concatenate(test.sequences)[:frames]


@pytest.mark.parametrize("copies, every", [(1, 20), (4, 20), (3, 30)])
def test_stream_states_prediction_rests_on_bounded_history(
        runner, basicmotions_test, copies, every):
    resets = []
    states = StreamStates(runner, copies, every, lambda key, why: resets.append(why))
    stream = states.get(("p", 0))
    frames = _stream_of(basicmotions_test, 3 * every + 7)
    history = every // copies
    for t, raw in enumerate(frames):
        scores = states.step(stream, runner.quantize_frame(raw))
        # The chosen copy has run between every - every/copies and every frames
        # (all frames so far, at the start: copies begin staggered as if part-way
        # through their period); running the model from a zero state on exactly
        # those frames gives the same scores.
        used = min(max(stream.frames), t + 1)
        assert used <= every
        if t + 1 >= every:
            assert used >= every - history
        fresh = runner.zero_states()
        for past in frames[t + 1 - used:t + 1]:
            expected = runner.step(runner.quantize_frame(past), fresh)
        np.testing.assert_array_equal(scores, expected)
    assert resets == ["start"]


def test_stream_states_without_reset_every_keeps_whole_history(runner,
                                                              basicmotions_test):
    states = StreamStates(runner)
    stream = states.get(("p", 1))
    sequence = basicmotions_test.sequences[5]
    for raw in sequence:
        scores = states.step(stream, runner.quantize_frame(raw))
    expected = runner.run_sequence(sequence)[-1]
    np.testing.assert_array_equal(runner.dequantize_scores(scores), expected)
    assert stream.total == len(sequence)


def test_stream_states_reset_port_resets_only_that_port(runner, basicmotions_test):
    reasons = []
    states = StreamStates(runner, on_reset=lambda key, why: reasons.append((key, why)))
    for key in [("a", 0), ("a", 1), ("b", 0)]:
        stream = states.get(key)
        states.step(stream, runner.quantize_frame(basicmotions_test.sequences[0][0]))
    assert states.reset_port("a", "reconnect") == 2
    assert [r for r in reasons if r[1] == "reconnect"] == [(("a", 0), "reconnect"),
                                                           (("a", 1), "reconnect")]
    assert states.streams[("b", 0)].total == 1
    assert states.streams[("a", 0)].total == 0
    zero = runner.zero_states()[0]
    np.testing.assert_array_equal(states.streams[("a", 0)].states[0][0], zero)


def test_stream_states_snapshot_restores_exact_state(runner, basicmotions_test,
                                                     tmp_path):
    states = StreamStates(runner, 2, 40)
    for sid in range(3):
        stream = states.get(("p", sid))
        stream.last_seq = 17 + sid
        for raw in basicmotions_test.sequences[sid][:33]:
            states.step(stream, runner.quantize_frame(raw))
    path = states.snapshot(tmp_path, "abc")
    assert path.stat().st_mode & 0o777 == 0o600

    restored = StreamStates(runner, 2, 40)
    assert restored.restore(tmp_path, "abc", max_age_s=60) == 3
    for key, stream in states.streams.items():
        other = restored.streams[key]
        assert other.frames == stream.frames and other.last_seq == stream.last_seq
        for a, b in zip(stream.states, other.states):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("damage, words", [
    ("other model", "another model"),
    ("too old", "old"),
    ("truncated", "unreadable"),
    ("garbage", "unreadable"),
    ("other copies", "bounded-history"),
])
def test_stream_states_restore_refuses_bad_snapshot_with_warning(
        runner, basicmotions_test, tmp_path, caplog, damage, words):
    states = StreamStates(runner, 1, 0)
    stream = states.get(("p", 0))
    states.step(stream, runner.quantize_frame(basicmotions_test.sequences[0][0]))
    path = states.snapshot(tmp_path, "abc")
    sha, max_age, target = "abc", 60.0, StreamStates(runner, 1, 0)
    if damage == "other model":
        sha = "def"
    elif damage == "too old":
        max_age = 1e-9
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 512)
    else:
        target = StreamStates(runner, 2, 10)
    assert target.restore(tmp_path, sha, max_age) == 0
    assert target.streams == {}
    assert any(words in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
