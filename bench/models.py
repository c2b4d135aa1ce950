"""The models compared: int8 step models and int8 sliding-window models.

This module imports TensorFlow and runs in a child process of :mod:`bench.run`
(``python -m bench.models JOBS.json RESULTS.json``); the models it writes are
timed by :mod:`bench.invoke` in another child that never imports TensorFlow.

- A step model goes the product's way: a Keras model from
  :func:`edgernn.train.build_model`, then :func:`edgernn.build.export_model`,
  :func:`edgernn.build.quantize_export` (calibrated on BasicMotions) and
  :func:`edgernn.build.write_models`, giving a model folder the daemon can load.
- A window model is the same network over a fixed window of W frames: batch 1,
  the recurrent layers with ``unroll=True``, only the last frame's scores, full
  int8 (int8 input and output). Normalization is left outside, as in the step
  model, so both get the same int8 frames.

Networks timed but not trained get random weights drawn from a seeded numpy
generator, so every child process makes the same network for a (cell, units)
pair whatever order it builds them in. Training adds nothing to a timing; the
agreement of predictions is measured on the trained BasicMotions model instead.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CALIBRATION_WINDOWS = 32


def load_training_data(name: str = "basicmotions") -> Any:
    """The built-in dataset's training split (:class:`edgernn.datasets.Dataset`)."""
    from edgernn.datasets import load_builtin

    return load_builtin(name)[0]


def make_random_network(cell: str, units: int, features: int, classes: int,
                        mean: np.ndarray, std: np.ndarray, seed: int = 0) -> Any:
    """The default classifier's architecture with seeded random weights.

    Kernels are drawn uniformly with Glorot's limit; recurrent kernels are scaled
    normal draws of spectral radius about 1, so the state neither dies out nor
    saturates over hundreds of steps.

    Args:
        cell: ``simplernn``, ``gru`` or ``lstm``.
        units: Units of the recurrent layer.
        features: Channels per frame.
        classes: Output scores.
        mean, std: float32 (features,) normalization kept in the model.
        seed: Combined with (cell, units) into the generator's seed.

    Returns:
        A Keras model taking float32 (batch, time, features) raw frames.
    """
    from edgernn.train import TrainSettings, build_model

    model = build_model(features, classes, TrainSettings(cell=cell, units=units),
                        mean, std)
    rng = np.random.default_rng([seed, zlib.crc32(f"{cell}{units}".encode())])
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("SimpleRNN", "GRU", "LSTM", "Dense"):
            continue
        weights = []
        for i, w in enumerate(layer.get_weights()):
            if i == 0:
                limit = np.sqrt(6.0 / (w.shape[0] + w.shape[-1]))
                value = rng.uniform(-limit, limit, w.shape)
            elif i == 1 and kind != "Dense":
                value = rng.standard_normal(w.shape) / np.sqrt(units)
            else:
                value = rng.uniform(-0.1, 0.1, w.shape)
            weights.append(value.astype(np.float32))
        layer.set_weights(weights)
    return model


def make_window_network(model: Any, window: int) -> Any:
    """The same network over a fixed window, unrolled, scoring the last frame only.

    Args:
        model: A Keras chain of [Normalization], recurrent layers, Dense layers
            (as :func:`edgernn.train.build_model` makes).
        window: W, frames per window.

    Returns:
        A Keras model taking float32 (1, W, features) normalized frames and giving
        float32 (1, classes) scores; its weights are copies of ``model``'s.
    """
    import keras

    features = int(model.inputs[0].shape[-1])
    kept = [layer for layer in model.layers
            if type(layer).__name__ in ("SimpleRNN", "GRU", "LSTM", "Dense")]
    recurrent = [layer for layer in kept if type(layer).__name__ != "Dense"]
    layers = [keras.Input((window, features), batch_size=1, name="window")]
    copies = []
    for layer in kept:
        config = layer.get_config()
        if layer in recurrent:
            config.update(unroll=True, stateful=False,
                          return_sequences=layer is not recurrent[-1])
        copy = type(layer).from_config(config)
        layers.append(copy)
        copies.append((copy, layer))
    window_model = keras.Sequential(layers, name=f"window_{window}")
    for copy, layer in copies:
        copy.set_weights(layer.get_weights())
    return window_model


def cut_windows(sequences: list[np.ndarray], window: int, count: int,
                seed: int = 0) -> list[np.ndarray]:
    """Windows of ``window`` frames cut at random from the sequences played end to end.

    Args:
        sequences: Normalized float32 (frames, features) each.
        window: Frames per window; may exceed one sequence's length.
        count: Windows to cut.

    Returns:
        ``count`` float32 arrays of shape (1, window, features).
    """
    stream = np.concatenate([np.nan_to_num(np.asarray(s, np.float32))
                             for s in sequences])
    while len(stream) < window + 1:
        stream = np.concatenate([stream, stream])
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - window, count)
    return [stream[s:s + window][None].astype(np.float32) for s in starts]


def convert_window_int8(window_model: Any, calibration: list[np.ndarray]) -> bytes:
    """Full-integer conversion (int8 input, weights, activations and output).

    Args:
        window_model: From :func:`make_window_network`.
        calibration: Normalized float32 (1, W, features) windows.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(window_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([w] for w in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def write_step_folder(model: Any, train: Any, out_dir: Path, name: str) -> dict:
    """Exports, quantizes and writes a step model folder (the product's path).

    Returns:
        The normalization the folder's manifest holds: {"mean": [...], "std": [...]}.
    """
    from edgernn import build

    export = build.export_model(model)
    models = build.quantize_export(export, train.sequences)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = {len(s) for s in train.sequences}
    build.write_models(out_dir, export, models, train.class_names, name,
                       lengths.pop() if len(lengths) == 1 else 0, train.channel_names)
    return {"mean": export.mean.tolist(), "std": export.std.tolist()}


class _Networks:
    """Builds each source network once per process."""

    def __init__(self, train: Any, seed: int):
        from edgernn.train import normalization_stats

        self.train = train
        self.seed = seed
        self.mean, self.std = normalization_stats(train.sequences)
        self._cache: dict[Any, Any] = {}

    def get(self, job: dict) -> Any:
        key = job.get("source") or (job["cell"], job["units"])
        if key not in self._cache:
            if job.get("source"):
                from edgernn.build import load_keras_model

                self._cache[key] = load_keras_model(job["source"])
            else:
                self._cache[key] = make_random_network(
                    job["cell"], job["units"], self.train.channels,
                    len(self.train.class_names), self.mean, self.std, self.seed)
        return self._cache[key]


def run_job(job: dict, networks: _Networks, out_dir: Path) -> dict:
    """Makes one model; returns the job with what came out of it."""
    from edgernn.build import export_model

    started = time.monotonic()
    model = networks.get(job)
    path = out_dir / job["out"]
    if job["kind"] == "step":
        write_step_folder(model, networks.train, path,
                          f"{job.get('cell', 'trained')}{job.get('units', '')}")
        size = (path / "step_int8.tflite").stat().st_size
    else:
        export = export_model(model)
        normalized = [export.normalize(s) for s in networks.train.sequences]
        calibration = cut_windows(normalized, job["window"], CALIBRATION_WINDOWS)
        path.write_bytes(convert_window_int8(make_window_network(model,
                                                                 job["window"]),
                                             calibration))
        size = path.stat().st_size
        (path.with_suffix(".json")).write_text(json.dumps(
            {"mean": export.mean.tolist(), "std": export.std.tolist()}))
    return dict(job, ok=True, path=str(path), bytes=size,
                convert_s=time.monotonic() - started, peak_rss_mb=_peak_rss_mb())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_jobs(jobs: list[dict], out_dir: Path, deadline_unix: float | None = None,
             seed: int = 0, data: str = "basicmotions") -> list[dict]:
    """Runs jobs in order; jobs not started by the deadline are skipped, not run.

    Args:
        jobs: Each {"kind": "step"|"window", "cell", "units"} or {"source":
            path of a .keras model}, "window" (W, window jobs) and "out" (a name
            inside ``out_dir``).
        out_dir: Where the models go.
        deadline_unix: time.time() after which no job starts.

    Returns:
        One result per job: the job with ok, path, bytes, convert_s, or ok False
        with ``error`` saying why.
    """
    networks = _Networks(load_training_data(data), seed)
    results = []
    for job in jobs:
        if deadline_unix is not None and time.time() > deadline_unix:
            results.append(dict(job, ok=False, error="not converted: the conversion "
                                "time budget was spent on smaller models"))
            continue
        try:
            results.append(run_job(job, networks, out_dir))
        except Exception as e:  # noqa: BLE001 - a failed conversion is a result
            logger.warning("job %s failed: %s: %s", job, type(e).__name__, e)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            results.append(dict(job, ok=False,
                                error=f"{type(e).__name__}: {first}"[:300]))
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.models JOBS.json RESULTS.json``."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(Path(argv[0]).read_text())
    results = run_jobs(spec["jobs"], Path(spec["out_dir"]), spec.get("deadline_unix"),
                       spec.get("seed", 0), spec.get("data", "basicmotions"))
    Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
