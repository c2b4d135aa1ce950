"""Running the step model one frame at a time, with the caller holding the state.

:class:`StepRunner` binds every tensor by the name the manifest gives (never by
position: the converter reorders them), checks shapes and quantization against
the manifest, and does one step: quantize the frame, set the state, invoke, read
the scores and the new state.

Quantization of the frame folds normalization and quantization into one multiply
and add per channel: q = round(raw * a + b) with a = 1 / (std * scale) and
b = zero_point - mean * a, clipped to [-128, 127].

When a state's input and output quantization differ (the manifest says so), the
int8 output is mapped to the input's parameters through a 256-entry table:
lut[q_out + 128] = clip(round((q_out - zp_out) * s_out / s_in + zp_in)).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgernnd.errors import ManifestError
from edgernnd.manifest import Manifest, Quantization, StatePair, verify_model_file
from edgernnd.runtime import Runtime, make_interpreter

logger = logging.getLogger(__name__)


def make_requantize_table(source: Quantization, target: Quantization) -> np.ndarray:
    """int8 lookup table (256,) taking a value quantized by ``source`` to ``target``."""
    q = np.arange(-128, 128, dtype=np.float64)
    real = (q - source.zero_point) * source.scale
    return np.clip(np.round(real / target.scale + target.zero_point), -128, 127).astype(
        np.int8)


class StepRunner:
    """One interpreter running a manifest's step model.

    Args:
        manifest: The loaded manifest.
        variant: ``int8`` (default), ``edgetpu`` or ``float32``.
        runtime: TFLite runtime (imported when None).
        delegates: Loaded delegates, e.g. the Edge TPU's.

    Attributes:
        state_dtype: numpy dtype of state tensors (int8, or float32 for float32).
        state_shapes: Per state pair, its tensor shape (1, units).
    """

    def __init__(self, manifest: Manifest, variant: str = "int8",
                 runtime: Runtime | None = None, delegates: list | None = None):
        self.manifest = manifest
        self.variant = variant
        path = verify_model_file(manifest, variant)
        self.interpreter = make_interpreter(path, runtime, delegates)
        tensors = manifest.models[variant].tensors
        details = {d["name"]: d for d in self.interpreter.get_input_details()
                   + self.interpreter.get_output_details()}

        def bind(signature_name: str, shape: tuple[int, ...]) -> dict:
            tensor = tensors[signature_name]
            if tensor not in details:
                raise ManifestError(
                    f"{variant} model has no tensor {tensor!r} (for {signature_name!r}) "
                    "as the manifest says; the model and manifest do not belong together"
                )
            d = details[tensor]
            if tuple(d["shape"]) != shape:
                raise ManifestError(
                    f"tensor {tensor!r} has shape {tuple(d['shape'])}, the manifest "
                    f"says {shape}; rebuild the model folder"
                )
            return d

        self._frame = bind("frame", (1, manifest.features))
        self._scores = bind("scores", (1, len(manifest.labels)))
        self._state_in = [bind(s.name, (1, s.size)) for s in manifest.states]
        self._state_out = [bind(s.output_name, (1, s.size)) for s in manifest.states]
        self.quantized = self._frame["dtype"] == np.int8
        self.state_dtype = np.int8 if self.quantized else np.float32
        self.state_shapes = [(1, s.size) for s in manifest.states]

        mean = np.asarray(manifest.mean, np.float32)
        std = np.asarray(manifest.std, np.float32)
        if self.quantized:
            scale, zero_point = self._frame["quantization"]
            self._frame_a = (1.0 / (std * scale)).astype(np.float32)
            self._frame_b = (zero_point - mean * self._frame_a).astype(np.float32)
            s_scale, s_zero = self._scores["quantization"]
            self._scores_scale, self._scores_zero = float(s_scale), int(s_zero)
            self._scores_table = [float((q - s_zero) * np.float32(s_scale))
                                  for q in range(-128, 128)]
        else:
            self._frame_a = (1.0 / std).astype(np.float32)
            self._frame_b = (-mean / std).astype(np.float32)
        self._tables = [self._state_table(pair, i, o)
                        for pair, i, o in zip(manifest.states, self._state_in,
                                              self._state_out)]
        self._frame_index = self._frame["index"]
        self._scores_index = self._scores["index"]
        self._in_index = [d["index"] for d in self._state_in]
        self._out_index = [d["index"] for d in self._state_out]

    def _state_table(self, pair: StatePair, d_in: dict, d_out: dict) -> np.ndarray | None:
        if not self.quantized:
            return None
        q_in = Quantization(*map(float, d_in["quantization"]))
        q_out = Quantization(*map(float, d_out["quantization"]))
        if (q_in.scale, q_in.zero_point) != (q_out.scale, q_out.zero_point):
            logger.info("state %s: input and output quantization differ; "
                        "requantizing through a lookup table", pair.name)
            return make_requantize_table(
                Quantization(q_out.scale, int(q_out.zero_point)),
                Quantization(q_in.scale, int(q_in.zero_point)))
        return None

    def zero_states(self) -> list[np.ndarray]:
        """A fresh state: real value 0 in every unit, in the input tensors' encoding."""
        states = []
        for d in self._state_in:
            if self.quantized:
                states.append(np.full(d["shape"], d["quantization"][1], np.int8))
            else:
                states.append(np.zeros(d["shape"], np.float32))
        return states

    def quantize_frame(self, raw: np.ndarray) -> np.ndarray:
        """Normalizes and quantizes a raw frame.

        Args:
            raw: float32 (features,) raw sensor values.

        Returns:
            (1, features) int8 (or float32 for a float32 model).
        """
        x = np.asarray(raw, np.float32) * self._frame_a + self._frame_b
        if not self.quantized:
            return x.reshape(1, -1)
        return np.clip(np.rint(x), -128, 127).astype(np.int8).reshape(1, -1)

    def step(self, frame: np.ndarray, states: list[np.ndarray]) -> np.ndarray:
        """Runs one frame. ``states`` is updated in place with the next state.

        Args:
            frame: (1, features) from :meth:`quantize_frame`.
            states: One array per state pair, shape (1, units), int8 (or float32);
                read as the state before the frame, overwritten with the one after.

        Returns:
            Raw scores (1, classes), int8 (or float32); see :meth:`dequantize_scores`.
        """
        interpreter = self.interpreter
        interpreter.set_tensor(self._frame_index, frame)
        for index, state in zip(self._in_index, states):
            interpreter.set_tensor(index, state)
        interpreter.invoke()
        for index, state, table in zip(self._out_index, states, self._tables):
            new = interpreter.get_tensor(index)
            state[...] = new if table is None else table[new.astype(np.int16) + 128]
        return interpreter.get_tensor(self._scores_index)

    def read_scores(self, scores: np.ndarray) -> tuple[int, tuple[float, ...]]:
        """The top class and every score as Python floats, for publishing.

        Args:
            scores: (1, classes) from :meth:`step`.

        Returns:
            (index of the highest score, scores in label order). An int8 score
            takes one of 256 values, so they are looked up in a table: on the
            per-frame path that is several times cheaper than numpy arithmetic
            on a handful of numbers.
        """
        values = scores.ravel().tolist()
        best = values.index(max(values))
        if not self.quantized:
            return best, tuple(values)
        table = self._scores_table
        return best, tuple([table[v + 128] for v in values])

    def dequantize_scores(self, scores: np.ndarray) -> np.ndarray:
        """Scores as float32 (classes,) probabilities."""
        if not self.quantized:
            return np.asarray(scores, np.float32).reshape(-1)
        return ((scores.astype(np.float32) - self._scores_zero)
                * self._scores_scale).reshape(-1)

    def dequantize_state(self, index: int, state: np.ndarray) -> np.ndarray:
        """A state's real values, float32, for checking drift against float."""
        if not self.quantized:
            return np.asarray(state, np.float32)
        scale, zero_point = self._state_in[index]["quantization"]
        return (state.astype(np.float32) - zero_point) * scale

    def run_sequence(self, sequence: np.ndarray) -> np.ndarray:
        """Scores after every frame of one sequence from a zero state.

        Args:
            sequence: float32 (frames, features) raw values.

        Returns:
            float32 (frames, classes).
        """
        states = self.zero_states()
        out = np.empty((len(sequence), len(self.manifest.labels)), np.float32)
        for t, raw in enumerate(np.asarray(sequence, np.float32)):
            out[t] = self.dequantize_scores(self.step(self.quantize_frame(raw), states))
        return out

    def describe(self) -> dict[str, Any]:
        """What is bound to what, for the start-up log."""
        return {"variant": self.variant, "frame": self._frame["name"],
                "scores": self._scores["name"],
                "states": [d["name"] for d in self._state_in]}
