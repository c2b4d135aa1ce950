"""The daemon's frame path in one process against a bare invoke loop (child process).

``python -m bench.pipeline JOB.json RESULT.json`` with EDGERNN_RUNTIME naming the
runtime. Never imports TensorFlow (see :mod:`bench.child`).

The pipeline is the real code: bytes of binary frames go through
:class:`edgernnd.binary_codec.BinaryDecoder`, then the daemon's own
``Daemon._process`` (stream lookup, sequence and value checks, normalize and
quantize, state swap through :class:`edgernnd.state.StreamStates`, invoke,
dequantize, the publishing policy), and its :class:`edgernnd.publish.Publisher`
hands each prediction to a sink that encodes it with
:func:`edgernnd.sinks.encode_prediction` and throws the bytes away. A repeat ends
when the sink has taken every prediction. Only the serial port and the stdout
write are left out; :mod:`bench.daemon_load` measures those.

Streams are interleaved: each chunk of bytes holds one frame of every stream, as
a sender multiplexing S sensors on one port writes them.

The bare loop runs the same interpreter with nothing around it: set the int8
frame and state, invoke, read the scores and the state, for S states in turn.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
import time

import numpy as np

from bench import child
from bench.timing import time_repeated
from edgernnd.binary_codec import BinaryDecoder, encode_frame
from edgernnd.config import parse_config
from edgernnd.daemon import Daemon
from edgernnd.frames import Prediction
from edgernnd.notify import Notifier
from edgernnd.publish import Publisher
from edgernnd.runtime import import_runtime
from edgernnd.sinks import encode_prediction

PORT_NAME = "bench"
POOL_FRAMES = 8192
DRAIN_TIMEOUT_S = 30.0


class NullSink:
    """Encodes each prediction as the stdout sink would and drops the bytes.

    Attributes:
        count: Predictions taken.
        encoded_bytes: Bytes the JSON lines would have had.
    """

    name = "null"

    def __init__(self, labels: tuple[str, ...]):
        self._labels = labels
        self.count = 0
        self.encoded_bytes = 0
        self._target = 0
        self._reached = threading.Event()

    def expect(self, total: int) -> None:
        """Arms :meth:`wait` for the moment ``count`` reaches ``total``."""
        self._reached.clear()
        self._target = total
        if self.count >= total:
            self._reached.set()

    def wait(self, timeout_s: float) -> bool:
        return self._reached.wait(timeout_s)

    def encode(self, prediction: Prediction) -> bytes:
        """As the stdout and file sinks: one JSON line."""
        return encode_prediction(prediction, self._labels) + b"\n"

    def write_lines(self, lines: list[bytes]) -> None:
        """Takes a batch as the line sinks do, and drops it."""
        self.encoded_bytes += sum(map(len, lines))
        self.count += len(lines)
        if self.count >= self._target:
            self._reached.set()

    def publish(self, prediction: Prediction) -> None:
        self.write_lines([self.encode(prediction)])

    def close(self) -> None:
        pass


class _InlinePublisher:
    """Publishes in the caller's thread, so that one profile sees every step."""

    def __init__(self, sink: NullSink):
        self.sink = sink

    def submit(self, prediction: Prediction) -> None:
        self.sink.publish(prediction)

    def submit_many(self, predictions: list[Prediction]) -> None:
        for prediction in predictions:
            self.sink.publish(prediction)


def make_daemon(model_dir: str) -> Daemon:
    """A daemon on the model, with no port opened and no notifications."""
    config = parse_config({}, {"model": {"dir": model_dir, "accelerator": "cpu"},
                               "port": [{"url": "/dev/null", "name": PORT_NAME}]})
    return Daemon(config, notifier=Notifier(None))


def encode_chunks(features: int, streams: int, seed: int = 0) -> list[bytes]:
    """Chunks of one binary frame per stream, sequence numbers running on.

    Returns:
        About :data:`POOL_FRAMES` / streams chunks (at least 16).
    """
    rng = np.random.default_rng(seed)
    ticks = max(16, POOL_FRAMES // streams)
    values = rng.standard_normal((ticks, streams, features)).astype(np.float32)
    return [b"".join(encode_frame(s, t, values[t, s], sensor_time_ms=t * 10)
                     for s in range(streams)) for t in range(ticks)]


def time_pipeline(daemon: Daemon, chunks: list[bytes], streams: int, repeats: int,
                  min_repeat_s: float):
    """Median seconds per frame through decode, ``_process`` and the publisher."""
    sink = NullSink(daemon.labels)
    daemon.publisher = Publisher(sink, daemon.config.publish.queue_size, daemon.metrics)
    decoder = BinaryDecoder(channels=daemon.manifest.features)
    process = daemon._process
    published = [0]

    def run(n: int) -> None:
        target = published[0] + n * streams
        sink.expect(target - daemon.publisher.dropped)
        pool = len(chunks)
        for i in range(n):
            frames = decoder.feed(chunks[i % pool])
            process(PORT_NAME, frames, time.monotonic())
        while not sink.wait(0.05):
            if sink.count + daemon.publisher.dropped >= target:
                break
            if time.monotonic() - started > DRAIN_TIMEOUT_S:
                raise RuntimeError("the publisher did not drain")
        published[0] = target

    started = time.monotonic()
    timing = time_repeated(run, repeats, min_repeat_s)
    daemon.publisher.close(timeout_s=5.0)
    per_frame = timing.median_s / streams
    return per_frame, timing, {"dropped": daemon.publisher.dropped,
                               "json_bytes_per_prediction":
                                   sink.encoded_bytes / max(sink.count, 1),
                               "decoder_rejected": sum(decoder.stats.rejected.values())}


def time_bare(daemon: Daemon, streams: int, repeats: int, min_repeat_s: float):
    """Median seconds per frame of set_tensor + invoke + get_tensor, S states."""
    runner = daemon.runner
    interpreter = runner.interpreter
    rng = np.random.default_rng(1)
    frames = [runner.quantize_frame(v) for v in rng.standard_normal(
        (256, daemon.manifest.features)).astype(np.float32)]
    states = [runner.zero_states() for _ in range(streams)]
    frame_index, scores_index = runner._frame_index, runner._scores_index
    pairs = list(zip(runner._in_index, runner._out_index))

    def run(n: int) -> None:
        for i in range(n):
            state = states[i % streams]
            interpreter.set_tensor(frame_index, frames[i & 255])
            for (index_in, _), value in zip(pairs, state):
                interpreter.set_tensor(index_in, value)
            interpreter.invoke()
            interpreter.get_tensor(scores_index)
            for (_, index_out), value in zip(pairs, state):
                value[...] = interpreter.get_tensor(index_out)

    return time_repeated(run, repeats, min_repeat_s)


def time_invoke_only(daemon: Daemon, repeats: int, min_repeat_s: float):
    """Median seconds of ``invoke()`` alone, inputs left as they are."""
    invoke = daemon.runner.interpreter.invoke

    def run(n: int) -> None:
        for _ in range(n):
            invoke()

    return time_repeated(run, repeats, min_repeat_s)


class _NoPublisher:
    """Takes predictions and does nothing, to time ``_process`` without the sink."""

    def submit(self, prediction: Prediction) -> None:
        pass

    def submit_many(self, predictions: list[Prediction]) -> None:
        pass


def time_stages(model_dir: str, repeats: int, min_repeat_s: float) -> dict:
    """Median microseconds per frame of each stage of the one-stream path.

    Stages: decode (``BinaryDecoder.feed`` of one frame), quantize
    (``StepRunner.quantize_frame``), step (``StepRunner.step``: set, invoke, get),
    process (``Daemon._process`` without publishing: includes quantize and step),
    encode (``encode_prediction`` of one record). What the pipeline costs beyond
    their sum is the hand-off to the publisher's thread.
    """
    daemon = make_daemon(model_dir)
    runner = daemon.runner
    chunks = encode_chunks(daemon.manifest.features, 1)
    decoder = BinaryDecoder(channels=daemon.manifest.features)
    frames = [decoder.feed(c) for c in chunks]
    values = [f[0].values for f in frames]
    quantized = [runner.quantize_frame(v) for v in values]
    states = runner.zero_states()
    prediction = Prediction(PORT_NAME, 0, 1, 10, time.time(), daemon.labels[0],
                            tuple(1.0 / len(daemon.labels) for _ in daemon.labels),
                            0.05)
    pool = len(chunks)
    daemon.publisher = _NoPublisher()
    process = daemon._process
    fresh = BinaryDecoder(channels=daemon.manifest.features)

    def loop(body):
        def run(n: int) -> None:
            for i in range(n):
                body(i % pool)
        return run

    bodies = {
        "decode": lambda i: fresh.feed(chunks[i]),
        "quantize": lambda i: runner.quantize_frame(values[i]),
        "step": lambda i: runner.step(quantized[i], states),
        "process": lambda i: process(PORT_NAME, frames[i], time.monotonic()),
        "encode": lambda i: encode_prediction(prediction, daemon.labels),
        "empty loop": lambda i: None,
    }
    return {name: time_repeated(loop(body), repeats, min_repeat_s).median_s * 1e6
            for name, body in bodies.items()}


def profile_pipeline(model_dir: str, frames: int, top: int = 15) -> dict:
    """cProfile of the one-stream pipeline, the publisher run inline.

    Returns:
        total_s and the ``top`` functions by own time: file:line(function),
        own and cumulative seconds and their share of the total.
    """
    daemon = make_daemon(model_dir)
    sink = NullSink(daemon.labels)
    daemon.publisher = _InlinePublisher(sink)
    chunks = encode_chunks(daemon.manifest.features, 1)
    decoder = BinaryDecoder(channels=daemon.manifest.features)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(frames):
        daemon._process(PORT_NAME, decoder.feed(chunks[i % len(chunks)]),
                        time.monotonic())
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = stats.total_tt
    rows = []
    for (path, line, function), (_, calls, own, cumulative, _) in sorted(
            stats.stats.items(), key=lambda item: -item[1][2])[:top]:
        rows.append({"where": f"{_short(path)}:{line}({function})", "calls": calls,
                     "own_s": own, "own_share": own / total if total else 0.0,
                     "cumulative_s": cumulative,
                     "cumulative_share": cumulative / total if total else 0.0})
    return {"frames": frames, "total_s": total, "top": rows,
            "note": "cProfile, one stream, publisher inline (no queue hand-off); "
                    "profiling inflates Python-level costs"}


def _short(path: str) -> str:
    for marker in ("/edgernnd/", "/bench/", "/site-packages/", "/lib/python"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


def run(job: dict) -> dict:
    """Pipeline against bare loop for each stream count, then one profile."""
    repeats, min_s = job["repeats"], job["min_repeat_s"]
    runtime = import_runtime()
    result: dict = {"runtime": runtime.name, "runtime_version": runtime.version,
                    "streams": []}
    for streams in job["streams"]:
        daemon = make_daemon(job["model_dir"])
        chunks = encode_chunks(daemon.manifest.features, streams)
        pipeline_s, pipeline_timing, extra = time_pipeline(
            daemon, chunks, streams, repeats, min_s)
        bare = time_bare(daemon, streams, repeats, min_s)
        result["streams"].append({
            "streams": streams, "pipeline_fps": 1.0 / pipeline_s,
            "bare_fps": 1.0 / bare.median_s,
            "ratio": bare.median_s / pipeline_s,
            "pipeline_timing": pipeline_timing.to_dict(),
            "bare_timing": bare.to_dict(), **extra})
    invoke = time_invoke_only(make_daemon(job["model_dir"]), repeats, min_s)
    result["invoke_only_fps"] = invoke.rate_hz
    if job.get("stages"):
        result["stages_us"] = time_stages(job["model_dir"], repeats, min_s)
    if job.get("profile_frames"):
        result["profile"] = profile_pipeline(job["model_dir"], job["profile_frames"])
    return result


def main(argv: list[str] | None = None) -> int:
    return child.serve_job(run, argv)


if __name__ == "__main__":
    sys.exit(main())
