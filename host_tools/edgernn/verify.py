"""Parity report: Keras against the float step model, int8 against float, drift.

Everything is run through the real TFLite interpreter with the device's own
:class:`~edgernnd.runner.StepRunner`, so the figures are those of the files the
device will load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgernn.convert import host_runtime
from edgernnd.manifest import Manifest, write_text_atomic
from edgernnd.runner import StepRunner

logger = logging.getLogger(__name__)

DRIFT_STEPS = 100_000


def keras_prefix_scores(model: Any, sequence: np.ndarray) -> np.ndarray:
    """Keras scores after each prefix of a raw sequence: float32 (frames, classes).

    A model returning sequences gives every prefix in one call (a causal model's
    output at frame t depends only on frames up to t); otherwise each prefix is run.
    """
    x = np.asarray(sequence, np.float32)[None]
    y = np.asarray(model(x, training=False))
    if y.ndim == 3:
        return y[0]
    return np.stack([np.asarray(model(x[:, :t], training=False))[0]
                     for t in range(1, len(sequence) + 1)])


def verify(manifest: Manifest, sequences: list[np.ndarray], labels: np.ndarray,
           keras_model: Any = None, drift_steps: int = DRIFT_STEPS,
           plot_dir: Path | None = None) -> dict:
    """Builds the parity report.

    Args:
        manifest: The model folder's manifest (float32 and int8 models).
        sequences: Raw test sequences, float32 (frames, features).
        labels: int class index per sequence.
        keras_model: The source model, for the Keras parity check (optional).
        drift_steps: Length of the continuous stream for the drift check.
        plot_dir: Where to write PNG plots (none when None).

    Returns:
        The report as a JSON-ready dict.
    """
    runtime = host_runtime()
    float_runner = StepRunner(manifest, "float32", runtime)
    int8_runner = StepRunner(manifest, "int8", runtime)
    float_scores = [float_runner.run_sequence(s) for s in sequences]
    int8_scores = [int8_runner.run_sequence(s) for s in sequences]
    report: dict[str, Any] = {"sequences": len(sequences),
                              "frames": int(sum(len(s) for s in sequences))}

    if keras_model is not None:
        diffs = [float(np.max(np.abs(keras_prefix_scores(keras_model, s) - f)))
                 for s, f in zip(sequences, float_scores)]
        report["keras_vs_float_max_abs"] = max(diffs)

    per_step = np.concatenate([f.argmax(1) == q.argmax(1)
                               for f, q in zip(float_scores, int8_scores)])
    last_f = np.array([f[-1].argmax() for f in float_scores])
    last_q = np.array([q[-1].argmax() for q in int8_scores])
    report["int8_vs_float"] = {
        "top1_agreement_per_step": float(per_step.mean()),
        "top1_agreement_last_step": float((last_f == last_q).mean()),
        "max_abs_score_difference": float(max(np.max(np.abs(f - q)) for f, q in
                                              zip(float_scores, int8_scores))),
    }
    if len(labels):
        report["accuracy_last_step"] = {"float32": float((last_f == labels).mean()),
                                        "int8": float((last_q == labels).mean())}
    report["drift"] = measure_drift(float_runner, int8_runner, sequences, drift_steps,
                                    plot_dir)
    if plot_dir is not None:
        _plot_agreement(float_scores, int8_scores, plot_dir)
    return report


def measure_drift(float_runner: StepRunner, int8_runner: StepRunner,
                  sequences: list[np.ndarray], steps: int,
                  plot_dir: Path | None = None) -> dict:
    """Runs both models over one long stream without any reset.

    The stream concatenates the recordings, repeated, to ``steps`` frames. The
    error is |dequantized int8 state - float state|: its maximum and mean over
    all units of all states and all steps, and the mean over steps of the worst
    unit.
    "Bounded" means no NaN, the worst error in the last quarter is no more than
    twice that of the first quarter, and the int8 state is not stuck at its limits.
    """
    stream = np.concatenate(sequences)
    stream = np.resize(stream, (steps, stream.shape[1])).astype(np.float32)
    f_states = float_runner.zero_states()
    q_states = int8_runner.zero_states()
    errors = np.empty(steps, np.float32)  # worst unit at each step
    saturated = 0
    total = 0
    error_sum = 0.0
    for t in range(steps):
        raw = stream[t]
        float_runner.step(float_runner.quantize_frame(raw), f_states)
        int8_runner.step(int8_runner.quantize_frame(raw), q_states)
        worst = 0.0
        for i, (f, q) in enumerate(zip(f_states, q_states)):
            error = np.abs(int8_runner.dequantize_state(i, q) - f)
            worst = max(worst, float(error.max()))
            error_sum += float(error.sum())
            saturated += int(np.count_nonzero((q == 127) | (q == -128)))
            total += q.size
        errors[t] = worst
    quarter = max(steps // 4, 1)
    first, last = float(errors[:quarter].max()), float(errors[-quarter:].max())
    saturation = saturated / max(total, 1)
    result = {
        "steps": steps,
        "max_abs_state_error": float(np.nanmax(errors)),
        "mean_abs_state_error": error_sum / max(total, 1),
        "mean_worst_unit_error": float(np.nanmean(errors)),
        "max_error_first_quarter": first,
        "max_error_last_quarter": last,
        "saturated_fraction": saturation,
        "nan": bool(np.isnan(errors).any()),
        "bounded": bool(not np.isnan(errors).any() and last <= 2 * first + 1e-6
                        and saturation < 0.5),
    }
    if plot_dir is not None:
        _plot_drift(errors, plot_dir)
    return result


def write_report(report: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_agreement(float_scores, int8_scores, plot_dir: Path) -> None:
    plt = _pyplot()
    frames = max(len(f) for f in float_scores)
    agree = np.zeros(frames)
    count = np.zeros(frames)
    for f, q in zip(float_scores, int8_scores):
        agree[:len(f)] += f.argmax(1) == q.argmax(1)
        count[:len(f)] += 1
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(np.arange(1, frames + 1), agree / np.maximum(count, 1))
    ax.set_xlabel("frame within recording")
    ax.set_ylabel("int8 top-1 = float top-1")
    ax.set_ylim(0, 1.05)
    ax.set_title("int8 against float, per frame")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_dir / "agreement.png", dpi=100)
    plt.close(fig)


def _plot_drift(errors: np.ndarray, plot_dir: Path) -> None:
    plt = _pyplot()
    window = max(len(errors) // 500, 1)
    usable = len(errors) // window * window
    blocks = errors[:usable].reshape(-1, window)
    x = np.arange(len(blocks)) * window
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, blocks.max(1), label="max in window")
    ax.plot(x, blocks.mean(1), label="mean in window")
    ax.set_xlabel("step of a continuous stream (no reset)")
    ax.set_ylabel("worst unit: |int8 state - float state|")
    ax.set_title("state drift over a long stream")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_dir / "drift.png", dpi=100)
    plt.close(fig)
