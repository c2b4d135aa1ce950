"""Per-stream recurrent state: creation, resets, bounded history, snapshots.

Each stream (a port and a stream id) owns K copies of every state tensor, K being
``staggered_copies``. With ``reset_every`` N > 0, copy k is reset whenever
(frames - k * N / K) is a multiple of N, and the prediction is taken from the copy
that has run longest since its reset. Every prediction then rests on between
N - N/K and N frames of history: a model trained on windows of N frames never sees
more history than it was trained on, and the cost is K steps per frame instead of
the N steps of re-running a sliding window.

Snapshots are one ``.npz`` file written atomically (temporary file, fsync, rename)
with mode 0600. A snapshot is restored only when it was taken with the same model
(sha256) and is not older than configured; anything else is logged and ignored.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np

from edgernnd.manifest import write_bytes_atomic
from edgernnd.runner import StepRunner

logger = logging.getLogger(__name__)

SNAPSHOT_NAME = "states.npz"
SNAPSHOT_FORMAT = 1

StreamKey = tuple[str, int]  # (port name, stream id)


@dataclasses.dataclass
class Stream:
    """The state of one stream.

    Attributes:
        key: (port name, stream id).
        states: states[k][i] is copy k of state pair i, shape (1, units).
        frames: Frames run per copy since that copy's last reset.
        total: Frames run since the stream's last full reset.
        last_seq: Sequence number of the last frame, or None.
        last_seen: time.monotonic() of the last frame.
        published: Frames published so far, and the last published label, for
            the publishing policy.
    """

    key: StreamKey
    states: list[list[np.ndarray]]
    frames: list[int]
    total: int = 0
    last_seq: int | None = None
    last_seen: float = 0.0
    last_label: str | None = None
    count: int = 0


class StreamStates:
    """All streams' states, stepped through one :class:`StepRunner`.

    Args:
        runner: Runs the model.
        copies: K staggered copies per stream (1 = one state).
        reset_every: N; 0 = never reset for length.
        on_reset: Called as on_reset(key, reason) on every reset, for counting.
    """

    def __init__(self, runner: StepRunner, copies: int = 1, reset_every: int = 0,
                 on_reset=None):
        self.runner = runner
        self.copies = copies
        self.reset_every = reset_every
        self.on_reset = on_reset or (lambda key, reason: None)
        self.streams: dict[StreamKey, Stream] = {}
        # Copy k starts k*N/K frames "old", so the copies' resets are staggered.
        self._offsets = [k * reset_every // copies if reset_every else 0
                         for k in range(copies)]

    def get(self, key: StreamKey) -> Stream:
        """The stream's state, created (reason ``start``) on its first frame."""
        stream = self.streams.get(key)
        if stream is None:
            stream = Stream(key, [self.runner.zero_states() for _ in range(self.copies)],
                            list(self._offsets))
            self.streams[key] = stream
            self.on_reset(key, "start")
        return stream

    def reset(self, stream: Stream, reason: str) -> None:
        """Zeroes every copy of a stream's state."""
        for copy in stream.states:
            for state, zero in zip(copy, self.runner.zero_states()):
                state[...] = zero
        stream.frames = list(self._offsets)
        stream.total = 0
        self.on_reset(stream.key, reason)

    def reset_port(self, port: str, reason: str) -> int:
        """Resets every stream of a port; returns how many."""
        affected = [s for key, s in self.streams.items() if key[0] == port]
        for stream in affected:
            self.reset(stream, reason)
        return len(affected)

    def step(self, stream: Stream, frame: np.ndarray) -> np.ndarray:
        """Runs a quantized frame (1, features) through every copy of the stream.

        Returns:
            The raw scores (1, classes) of the copy with the longest history.
        """
        n = self.reset_every
        best, best_frames = None, -1
        for k, copy in enumerate(stream.states):
            if n and stream.frames[k] >= n:
                for state, zero in zip(copy, self.runner.zero_states()):
                    state[...] = zero
                stream.frames[k] = 0
            scores = self.runner.step(frame, copy)
            stream.frames[k] += 1
            if stream.frames[k] > best_frames:
                best, best_frames = scores, stream.frames[k]
        stream.total += 1
        return best

    def snapshot(self, directory: Path, model_sha256: str) -> Path:
        """Writes every stream's state to ``directory/states.npz`` atomically."""
        keys = list(self.streams)
        arrays: dict[str, np.ndarray] = {}
        for i, key in enumerate(keys):
            stream = self.streams[key]
            for k, copy in enumerate(stream.states):
                for j, state in enumerate(copy):
                    arrays[f"s{i}_{k}_{j}"] = state
            arrays[f"f{i}"] = np.asarray(stream.frames, np.int64)
        meta = {"format": SNAPSHOT_FORMAT, "model_sha256": model_sha256,
                "time": time.time(), "copies": self.copies,
                "reset_every": self.reset_every,
                "keys": [[port, sid] for port, sid in keys],
                "seq": [self.streams[k].last_seq for k in keys],
                "total": [self.streams[k].total for k in keys]}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = Path(directory) / SNAPSHOT_NAME
        write_bytes_atomic(path, buffer.getvalue(), mode=0o600)
        return path

    def restore(self, directory: Path, model_sha256: str, max_age_s: float) -> int:
        """Loads a snapshot if it fits; returns the number of streams restored.

        Never raises for a bad snapshot: it logs a WARNING saying why it was not
        used and starts from zero states.
        """
        path = Path(directory) / SNAPSHOT_NAME
        if not path.exists():
            return 0
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                age_s = time.time() - float(meta["time"])
                problem = None
                if meta.get("format") != SNAPSHOT_FORMAT:
                    problem = f"format {meta.get('format')!r} is not {SNAPSHOT_FORMAT}"
                elif meta["model_sha256"] != model_sha256:
                    problem = "it was taken with another model"
                elif age_s > max_age_s:
                    problem = f"it is {age_s:.0f} s old (limit {max_age_s:.0f} s)"
                elif (meta["copies"], meta["reset_every"]) != (self.copies,
                                                               self.reset_every):
                    problem = "the bounded-history settings changed"
                if problem:
                    logger.warning("state snapshot %s not restored: %s", path, problem)
                    return 0
                restored = {}
                for i, (port, sid) in enumerate(meta["keys"]):
                    key = (str(port), int(sid))
                    states = [[self._checked(data[f"s{i}_{k}_{j}"], j)
                               for j in range(len(self.runner.state_shapes))]
                              for k in range(self.copies)]
                    frames = [int(v) for v in data[f"f{i}"]]
                    stream = Stream(key, states, frames, total=int(meta["total"][i]),
                                    last_seq=self._checked_seq(meta["seq"][i]),
                                    last_seen=time.monotonic())
                    if len(frames) != self.copies:
                        raise ValueError(f"stream {key} has {len(frames)} frame "
                                         f"counts, expected {self.copies}")
                    restored[key] = stream
        except (OSError, ValueError, KeyError, TypeError, IndexError,
                zipfile.BadZipFile, EOFError) as e:
            logger.warning("state snapshot %s not restored: unreadable (%s: %s)", path,
                           type(e).__name__, e)
            return 0
        self.streams.update(restored)
        logger.info("restored the state of %d streams from %s (%.0f s old)",
                    len(restored), path, age_s)
        return len(restored)

    @staticmethod
    def _checked_seq(seq) -> int | None:
        # The daemon subtracts it from the next frame's seq; a wrong type here
        # would crash the main loop at that frame instead of being refused now.
        if seq is None or (type(seq) is int and 0 <= seq < 1 << 16):
            return seq
        raise ValueError(f"sequence number {seq!r} is not an integer in 0..65535")

    def _checked(self, array: np.ndarray, j: int) -> np.ndarray:
        shape = self.runner.state_shapes[j]
        if array.shape != shape or array.dtype != self.runner.state_dtype:
            raise ValueError(f"state {j} has shape {array.shape} {array.dtype}, "
                             f"expected {shape} {np.dtype(self.runner.state_dtype)}")
        return np.array(array)

