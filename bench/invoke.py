"""Per-frame cost of a step model against a sliding-window model (child process).

``python -m bench.invoke JOB.json RESULT.json`` with EDGERNN_RUNTIME naming the
runtime. Never imports TensorFlow (see :mod:`bench.child`).

Per frame, the step model does what :meth:`edgernnd.runner.StepRunner.step` does:
set the int8 frame and states, invoke, read the scores and the new states. The
window model keeps the last W int8 frames in a buffer, shifts the new frame in,
sets the whole window, invokes and reads the scores. Frames are quantized
beforehand for both, so the figures are the models' costs, not the normalization's.

Agreement: for every test recording, the step model runs from the recording's
start with its state carried over; at every frame t (1-based) with t >= W the
window model sees frames t-W+1..t, and the two top-1 labels are compared.
"""

from __future__ import annotations

import sys

import numpy as np

from bench import child
from bench.timing import time_repeated
from edgernnd.manifest import load_manifest
from edgernnd.runner import StepRunner
from edgernnd.runtime import Runtime, import_runtime, make_interpreter

FRAME_POOL = 256


class WindowModel:
    """A window model's interpreter and its int8 input quantization.

    Args:
        path: The ``.tflite`` file; input int8 (1, W, features), output int8
            (1, classes).
        runtime: The TFLite runtime.
    """

    def __init__(self, path: str, runtime: Runtime):
        self.interpreter = make_interpreter(path, runtime)
        (inp,) = self.interpreter.get_input_details()
        (out,) = self.interpreter.get_output_details()
        self.window = int(inp["shape"][1])
        self.features = int(inp["shape"][2])
        self.input_index = inp["index"]
        self.output_index = out["index"]
        self.scale, self.zero_point = inp["quantization"]

    def quantize(self, normalized: np.ndarray) -> np.ndarray:
        """float32 (..., features) normalized values to int8 in the input's encoding."""
        q = np.rint(np.asarray(normalized, np.float32) / self.scale + self.zero_point)
        return np.clip(q, -128, 127).astype(np.int8)

    def scores(self, window_q: np.ndarray) -> np.ndarray:
        """int8 (1, classes) scores of one int8 (1, W, features) window."""
        self.interpreter.set_tensor(self.input_index, window_q)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index)


def make_frame_pool(runner: StepRunner, seed: int = 0) -> list[np.ndarray]:
    """int8 (1, features) frames of roughly normal-range values, to cycle through."""
    rng = np.random.default_rng(seed)
    manifest = runner.manifest
    raw = (rng.standard_normal((FRAME_POOL, manifest.features)) * np.asarray(
        manifest.std) + np.asarray(manifest.mean)).astype(np.float32)
    return [runner.quantize_frame(r) for r in raw]


def time_step(runner: StepRunner, repeats: int, min_repeat_s: float):
    """Median seconds per frame of :meth:`StepRunner.step` (set, invoke, get)."""
    frames = make_frame_pool(runner)
    states = runner.zero_states()
    step = runner.step

    def run(n: int) -> None:
        pool = len(frames)
        for i in range(n):
            step(frames[i % pool], states)

    return time_repeated(run, repeats, min_repeat_s)


def time_window(model: WindowModel, frames: list[np.ndarray], repeats: int,
                min_repeat_s: float):
    """Median seconds per frame: shift one int8 frame in, set, invoke, get."""
    buffer = np.zeros((1, model.window, model.features), np.int8)
    interpreter = model.interpreter
    inp, out = model.input_index, model.output_index

    def run(n: int) -> None:
        pool = len(frames)
        for i in range(n):
            buffer[0, :-1] = buffer[0, 1:]
            buffer[0, -1] = frames[i % pool][0]
            interpreter.set_tensor(inp, buffer)
            interpreter.invoke()
            interpreter.get_tensor(out)

    return time_repeated(run, repeats, min_repeat_s)


def measure_agreement(runner: StepRunner, model: WindowModel,
                      recordings: list[np.ndarray], labels: np.ndarray) -> dict:
    """Top-1 agreement of step and window predictions wherever a full window exists.

    Args:
        runner: The trained step model.
        model: The same network as a window model.
        recordings: Raw float32 (frames, features) test recordings.
        labels: int true class per recording.

    Returns:
        frames_compared, top1_agreement, and each model's accuracy on those frames.
    """
    mean = np.asarray(runner.manifest.mean, np.float32)
    std = np.asarray(runner.manifest.std, np.float32)
    w = model.window
    agree = step_right = window_right = compared = 0
    for raw, label in zip(recordings, labels):
        step_top = runner.run_sequence(raw).argmax(axis=1)
        window_q = model.quantize(np.nan_to_num((raw - mean) / std))
        for t in range(w - 1, len(raw)):
            window_top = int(model.scores(window_q[None, t - w + 1:t + 1]).argmax())
            compared += 1
            agree += int(window_top == step_top[t])
            step_right += int(step_top[t] == label)
            window_right += int(window_top == label)
    if not compared:
        return {"window": w, "frames_compared": 0,
                "note": f"no recording has {w} frames"}
    return {"window": w, "frames_compared": compared,
            "top1_agreement": agree / compared,
            "step_accuracy": step_right / compared,
            "window_accuracy": window_right / compared}


def run(job: dict) -> dict:
    """Times every model of the job with one runtime; measures agreement."""
    runtime = import_runtime(job["runtime"])
    repeats, min_s = job["repeats"], job["min_repeat_s"]
    result: dict = {"runtime": runtime.name, "runtime_version": runtime.version,
                    "models": [], "agreement": []}
    for net in job["networks"]:
        runner = StepRunner(load_manifest(net["step_dir"]), "int8", runtime)
        step = time_step(runner, repeats, min_s)
        frames = make_frame_pool(runner)
        entry = {"cell": net["cell"], "units": net["units"],
                 "step_s": step.median_s, "step_timing": step.to_dict(),
                 "step_bytes": net.get("step_bytes"), "windows": []}
        for window in net["windows"]:
            model = WindowModel(window["path"], runtime)
            timing = time_window(model, frames, repeats, min_s)
            entry["windows"].append({
                "window": model.window, "window_s": timing.median_s,
                "ratio": timing.median_s / step.median_s,
                "window_timing": timing.to_dict(), "bytes": window.get("bytes"),
                "convert_s": window.get("convert_s")})
        result["models"].append(entry)
    agreement = job.get("agreement")
    if agreement:
        runner = StepRunner(load_manifest(agreement["step_dir"]), "int8", runtime)
        with np.load(agreement["recordings"]) as data:
            recordings = [data[f"r{i}"] for i in range(int(data["count"]))]
            labels = data["labels"]
        for window in agreement["windows"]:
            result["agreement"].append(measure_agreement(
                runner, WindowModel(window["path"], runtime), recordings, labels))
    return result


def main(argv: list[str] | None = None) -> int:
    return child.serve_job(run, argv)


if __name__ == "__main__":
    sys.exit(main())
