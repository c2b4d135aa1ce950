"""Rewrite a Keras sequence model as a one-frame step model with explicit state.

A Keras recurrent layer converts to a WHILE loop (SimpleRNN, GRU) or a fused LSTM
whose state lives inside the interpreter; neither runs on the Edge TPU and neither
lets the caller own the state. Here the weights are read out of the Keras layers and
the cell equations are written again with plain operations (matmul, add, sub, mul,
tanh, logistic, softmax), for batch 1 and one frame per call. Every recurrent state
becomes an input ``<layer>_<h|c>`` and an output ``<layer>_<h|c>_next``.

The work is in two steps: :func:`describe_model` reads a Keras model into a
:class:`StepSpec` (numpy weights, no TensorFlow graph), and :func:`make_step_function`
turns a spec into a ``tf.function`` that the converter understands.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from edgernnd.errors import ModelError

FRAME_INPUT = "frame"
SCORES_OUTPUT = "scores"

_ACTIVATIONS = ("tanh", "sigmoid", "relu", "linear", "softmax", "hard_sigmoid")

# Layers that need the whole sequence, or the future, to compute one output frame.
_CANNOT_STREAM = {
    "Bidirectional": "runs a second copy backwards from the end of the sequence",
    "Attention": "attends over the whole sequence",
    "AdditiveAttention": "attends over the whole sequence",
    "MultiHeadAttention": "attends over the whole sequence",
    "GlobalAveragePooling1D": "pools over the whole sequence",
    "GlobalMaxPooling1D": "pools over the whole sequence",
    "AveragePooling1D": "pools over neighbouring frames",
    "MaxPooling1D": "pools over neighbouring frames",
    "Conv1D": "convolves over neighbouring frames (non-causal or buffered)",
    "Flatten": "flattens the time axis",
    "RepeatVector": "repeats a sequence summary over time",
    "Masking": "masks frames by looking at their values across the sequence",
}

_IDENTITY_LAYERS = {"InputLayer", "Dropout", "GaussianNoise", "GaussianDropout",
                    "SpatialDropout1D", "ActivityRegularization", "AlphaDropout"}


@dataclasses.dataclass
class StateSpec:
    """One recurrent state of the step model.

    Attributes:
        name: Input tensor name, e.g. ``gru_1_h``; the output is ``name + "_next"``.
        layer: Name of the Keras layer it belongs to.
        size: Number of units; the tensor has shape (1, size), float32 before
            quantization.
    """

    name: str
    layer: str
    size: int

    @property
    def output_name(self) -> str:
        return self.name + "_next"


@dataclasses.dataclass
class Stage:
    """One per-frame computation, in order.

    Attributes:
        kind: ``affine`` (x * scale + offset), ``dense``, ``activation``,
            ``simplernn``, ``gru`` or ``lstm``.
        layer: Keras layer name.
        params: numpy arrays and settings of the stage (see ``_run_stage``).
        states: The states this stage owns (recurrent stages only).
    """

    kind: str
    layer: str
    params: dict[str, Any]
    states: list[StateSpec] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StepSpec:
    """A Keras sequence model read out as a step model.

    Attributes:
        features: Channels per frame.
        stages: The per-frame computations, in order.
        classes: Number of output scores.
        cells: Recurrent cell kinds in order, e.g. ``["gru", "gru"]``.
        output_activation: ``softmax`` or ``sigmoid`` (the step model's scores).
        softmax_added: True when the Keras model ended in logits and the step model
            adds a softmax so that its scores are probabilities.
    """

    features: int
    stages: list[Stage]
    classes: int
    cells: list[str]
    output_activation: str
    softmax_added: bool = False

    @property
    def states(self) -> list[StateSpec]:
        return [s for stage in self.stages for s in stage.states]

    def zero_states(self) -> dict[str, np.ndarray]:
        """Float32 zero states keyed by input name, each of shape (1, size)."""
        return {s.name: np.zeros((1, s.size), np.float32) for s in self.states}


def describe_model(model: Any) -> StepSpec:
    """Reads a Keras sequence model into a :class:`StepSpec`.

    The model must be a chain of layers taking (batch, time, features) input: any
    number of SimpleRNN, GRU or LSTM layers (``stateful`` and ``return_sequences``
    either way), with Dense, Dropout, Activation, Normalization and Rescaling layers
    before or after them.

    Raises:
        ModelError: A layer cannot run one frame at a time, the model has no
            recurrent layer, or its shape is not (batch, time, features).
    """
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    if shape is None or len(shape) != 3:
        raise ModelError(
            f"model input shape {shape!r} is not (batch, time, features); "
            "a streaming model takes sequences of frames"
        )
    features = int(shape[-1])
    stages: list[Stage] = []
    cells: list[str] = []
    width = features
    sequence_ended = False  # a recurrent layer returned only its last output
    for layer in _chain(model):
        kind = type(layer).__name__
        if kind == "TimeDistributed":
            layer, kind = layer.layer, type(layer.layer).__name__
        if kind in _IDENTITY_LAYERS:
            continue
        if kind in _CANNOT_STREAM:
            raise ModelError(
                f"layer {layer.name!r} ({kind}) {_CANNOT_STREAM[kind]}, so it cannot "
                "run one frame at a time; remove it or replace it with a recurrent layer"
            )
        if kind in ("SimpleRNN", "GRU", "LSTM"):
            if sequence_ended:
                raise ModelError(
                    f"layer {layer.name!r} ({kind}) follows a recurrent layer with "
                    "return_sequences=False; set return_sequences=True on the one before"
                )
            stage = _recurrent_stage(layer, kind, width)
            width = stage.states[0].size
            cells.append(kind.lower())
            sequence_ended = not layer.return_sequences
        elif kind == "Dense":
            stage = _dense_stage(layer, width)
            width = stage.params["kernel"].shape[1]
        elif kind == "Activation":
            stage = Stage("activation", layer.name,
                          {"activation": _activation_name(layer, layer.activation)})
        elif kind == "Normalization":
            stage = _normalization_stage(layer, width)
        elif kind == "Rescaling":
            stage = _rescaling_stage(layer, width)
        else:
            raise ModelError(
                f"layer {layer.name!r} ({kind}) is not supported in a step model; "
                "supported: SimpleRNN, GRU, LSTM, Dense, Dropout, Activation, "
                "Normalization, Rescaling"
            )
        stages.append(stage)

    if not cells:
        raise ModelError(
            "the model has no recurrent layer (SimpleRNN, GRU or LSTM); there is no "
            "state to stream"
        )
    last_activation = _last_activation(stages)
    softmax_added = False
    if last_activation not in ("softmax", "sigmoid"):
        stages.append(Stage("activation", "scores_softmax", {"activation": "softmax"}))
        last_activation, softmax_added = "softmax", True
    return StepSpec(features, stages, width, cells, last_activation, softmax_added)


def _chain(model: Any) -> list[Any]:
    """The model's layers in order, refusing graphs that branch or merge."""
    layers = list(model.layers)
    for layer in layers:
        nodes = getattr(layer, "_inbound_nodes", [])
        for node in nodes:
            inputs = getattr(node, "input_tensors", None) or []
            if len(inputs) > 1:
                raise ModelError(
                    f"layer {layer.name!r} ({type(layer).__name__}) takes "
                    f"{len(inputs)} inputs; only a chain of layers can be streamed"
                )
    return layers


def _activation_name(layer: Any, fn: Any) -> str:
    name = getattr(fn, "__name__", str(fn))
    if name not in _ACTIVATIONS:
        raise ModelError(
            f"layer {layer.name!r} uses activation {name!r}; the step model supports "
            f"{', '.join(_ACTIVATIONS)}"
        )
    return name


def _state_base(layer: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", layer.name)


def _recurrent_stage(layer: Any, kind: str, width: int) -> Stage:
    if getattr(layer, "go_backwards", False):
        raise ModelError(
            f"layer {layer.name!r} ({kind}) has go_backwards=True: it reads the "
            "sequence from its end, so it cannot stream; retrain with go_backwards=False"
        )
    cell = getattr(layer, "cell", layer)
    weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    units = int(recurrent.shape[0])
    if kernel.shape[0] != width:
        raise ModelError(
            f"layer {layer.name!r} expects {kernel.shape[0]} inputs per frame but "
            f"receives {width}"
        )
    use_bias = getattr(cell, "use_bias", True)
    gates = {"simplernn": 1, "gru": 3, "lstm": 4}[kind.lower()]
    bias = weights[2] if use_bias else np.zeros((gates * units,), np.float32)
    params = {
        "kernel": kernel,
        "recurrent_kernel": recurrent,
        "bias": bias,
        "activation": _activation_name(layer, cell.activation),
    }
    if kind != "SimpleRNN":
        params["recurrent_activation"] = _activation_name(
            layer, cell.recurrent_activation)
    if kind == "GRU":
        params["reset_after"] = bool(cell.reset_after)
        if cell.reset_after and bias.ndim == 1:  # no bias: both halves zero
            params["bias"] = np.zeros((2, 3 * units), np.float32)
    base = _state_base(layer)
    states = [StateSpec(f"{base}_h", layer.name, units)]
    if kind == "LSTM":
        states.append(StateSpec(f"{base}_c", layer.name, units))
    return Stage(kind.lower(), layer.name, params, states)


def _dense_stage(layer: Any, width: int) -> Stage:
    weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
    kernel = weights[0]
    if kernel.shape[0] != width:
        raise ModelError(
            f"layer {layer.name!r} expects {kernel.shape[0]} inputs but receives {width}"
        )
    bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[1], np.float32)
    return Stage("dense", layer.name, {
        "kernel": kernel, "bias": bias,
        "activation": _activation_name(layer, layer.activation),
    })


def _normalization_stage(layer: Any, width: int) -> Stage:
    mean = np.asarray(layer.mean, np.float32).reshape(-1)
    variance = np.asarray(layer.variance, np.float32).reshape(-1)
    if getattr(layer, "invert", False):
        raise ModelError(f"layer {layer.name!r} is an inverted Normalization; "
                         "it cannot be used on the input side of a step model")
    scale = 1.0 / np.sqrt(np.maximum(variance, 1e-7))
    return Stage("affine", layer.name, {
        "scale": np.broadcast_to(scale, (width,)).astype(np.float32),
        "offset": np.broadcast_to(-mean * scale, (width,)).astype(np.float32),
    })


def _rescaling_stage(layer: Any, width: int) -> Stage:
    scale = np.broadcast_to(np.asarray(layer.scale, np.float32), (width,))
    offset = np.broadcast_to(np.asarray(layer.offset, np.float32), (width,))
    return Stage("affine", layer.name, {"scale": scale.astype(np.float32),
                                        "offset": offset.astype(np.float32)})


def _last_activation(stages: list[Stage]) -> str:
    for stage in reversed(stages):
        if stage.kind in ("dense", "activation"):
            return stage.params["activation"]
        if stage.kind in ("simplernn", "gru", "lstm"):
            return "linear"
    return "linear"


def make_step_function(spec: StepSpec) -> Any:
    """Builds the step model as a ``tf.function`` with a fixed signature.

    Inputs: ``frame`` float32 (1, features) and every state float32 (1, units) by
    its :attr:`StateSpec.name`. Outputs: a dict with ``scores`` float32
    (1, classes) and every state's ``<name>_next``.
    """
    import tensorflow as tf

    signature = [tf.TensorSpec((1, spec.features), tf.float32, name=FRAME_INPUT)]
    signature += [tf.TensorSpec((1, s.size), tf.float32, name=s.name)
                  for s in spec.states]
    names = [s.name for s in spec.states]

    def step(frame, *states):
        state_in = dict(zip(names, states))
        outputs = run_stages(tf, spec, frame, state_in)
        return outputs

    return tf.function(step, input_signature=signature, autograph=False)


def run_stages(ops: Any, spec: StepSpec, frame: Any,
               states: dict[str, Any]) -> dict[str, Any]:
    """One step of the model, written once for TensorFlow and for numpy.

    Args:
        ops: The ``tensorflow`` module, or :data:`NUMPY_OPS` to run in numpy.
        spec: The step model.
        frame: (1, features) float32.
        states: (1, units) float32 per state input name.

    Returns:
        ``scores`` and ``<state>_next`` for every state.
    """
    act = _activations(ops)
    out: dict[str, Any] = {}
    x = frame
    for stage in spec.stages:
        p = stage.params
        if stage.kind == "affine":
            x = x * p["scale"] + p["offset"]
        elif stage.kind == "dense":
            x = act[p["activation"]](ops.matmul(x, p["kernel"]) + p["bias"])
        elif stage.kind == "activation":
            x = act[p["activation"]](x)
        else:
            x, new_states = _run_cell(ops, act, stage, x, states)
            out.update(new_states)
    out[SCORES_OUTPUT] = x
    return out


def _run_cell(ops, act, stage: Stage, x, states):
    p = stage.params
    kernel, recurrent, bias = p["kernel"], p["recurrent_kernel"], p["bias"]
    f = act[p["activation"]]
    h = states[stage.states[0].name]
    units = recurrent.shape[0]

    def part(matrix, i):  # columns of gate i
        return matrix[..., i * units:(i + 1) * units]

    if stage.kind == "simplernn":
        h_next = f(ops.matmul(x, kernel) + bias + ops.matmul(h, recurrent))
        return h_next, {stage.states[0].output_name: h_next}

    g = act[p["recurrent_activation"]]
    if stage.kind == "gru":
        # Keras gate order in the kernels: update z, reset r, candidate.
        if p["reset_after"]:
            b_in, b_rec = bias[0], bias[1]
        else:
            b_in, b_rec = bias, np.zeros_like(bias)
        xz = ops.matmul(x, part(kernel, 0)) + part(b_in, 0)
        xr = ops.matmul(x, part(kernel, 1)) + part(b_in, 1)
        xc = ops.matmul(x, part(kernel, 2)) + part(b_in, 2)
        z = g(xz + ops.matmul(h, part(recurrent, 0)) + part(b_rec, 0))
        r = g(xr + ops.matmul(h, part(recurrent, 1)) + part(b_rec, 1))
        if p["reset_after"]:
            candidate = f(xc + r * (ops.matmul(h, part(recurrent, 2)) + part(b_rec, 2)))
        else:
            candidate = f(xc + ops.matmul(r * h, part(recurrent, 2)))
        # z*h + (1-z)*candidate, written with one sub, one mul and one add.
        h_next = candidate + z * (h - candidate)
        return h_next, {stage.states[0].output_name: h_next}

    # LSTM, Keras gate order: input i, forget f, cell candidate, output o.
    c = states[stage.states[1].name]

    def gate(i):
        return (ops.matmul(x, part(kernel, i)) + part(bias, i)
                + ops.matmul(h, part(recurrent, i)))

    c_next = g(gate(1)) * c + g(gate(0)) * f(gate(2))
    h_next = g(gate(3)) * f(c_next)
    return h_next, {stage.states[0].output_name: h_next,
                    stage.states[1].output_name: c_next}


def _activations(ops: Any) -> dict[str, Any]:
    if ops is NUMPY_OPS:
        def sigmoid(v):
            return 1.0 / (1.0 + np.exp(-v))

        def softmax(v):
            e = np.exp(v - v.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        return {"tanh": np.tanh, "sigmoid": sigmoid, "linear": lambda v: v,
                "relu": lambda v: np.maximum(v, 0.0), "softmax": softmax,
                "hard_sigmoid": lambda v: np.clip(v + 3.0, 0.0, 6.0) / 6.0}
    return {"tanh": ops.tanh, "sigmoid": ops.sigmoid, "linear": lambda v: v,
            "relu": ops.nn.relu, "softmax": ops.nn.softmax,
            "hard_sigmoid": lambda v: ops.nn.relu6(v + 3.0) * (1.0 / 6.0)}


class _NumpyOps:
    """The few operations :func:`run_stages` needs, in numpy (float32)."""

    matmul = staticmethod(np.matmul)


NUMPY_OPS = _NumpyOps()
