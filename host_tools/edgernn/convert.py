"""Convert a step model to TFLite: float32, and full-integer int8 with int8 state.

Facts this module is built around (TensorFlow 2.21, checked):
- Conversion goes through a SavedModel with a ``serving_default`` signature: the
  calibrator needs a signature to take a representative dataset keyed by input
  name; a list in Keras input order fails.
- The converter reorders tensors (a state input came before the frame) and renames
  outputs (``PartitionedCall:0``...). Tensors are therefore bound through the
  signature once, here, and the manifest records each tensor's real name.
- An int8 ``tanh`` output gets scale 1/128 and zero point 0, while a calibrated
  state input gets slightly different parameters. Feeding the int8 output straight
  back would then be wrong by that ratio on every step. :func:`share_state_quantization`
  rewrites each state input's parameters to equal its output's, so the device copies
  int8 state back unchanged. That is exact, not an approximation: TFLite derives each
  kernel's fixed-point multipliers from the tensors' scales when the interpreter is
  prepared, so the consumers of the state input adapt to the new parameters.
"""

from __future__ import annotations

import logging
import platform
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from edgernn.step_model import (
    FRAME_INPUT,
    NUMPY_OPS,
    StepSpec,
    make_step_function,
    run_stages,
)
from edgernnd.errors import RuntimeUnavailableError
from edgernnd.manifest import Quantization
from edgernnd.runtime import Runtime, import_runtime, make_interpreter

logger = logging.getLogger(__name__)

SIGNATURE_KEY = "serving_default"


def convert_float(spec: StepSpec) -> bytes:
    """The float32 step model as ``.tflite`` bytes."""
    return _convert(spec, samples=None)


def convert_int8(spec: StepSpec, samples: list[dict[str, np.ndarray]]) -> bytes:
    """The full-integer step model: int8 frame, states and scores.

    Args:
        spec: The step model.
        samples: Calibration inputs, each keyed by signature input name: the
            normalized frame (1, features) float32 and the float state the model
            actually had before that frame, from :func:`record_calibration_samples`.
    """
    return _convert(spec, samples=samples)


def _convert(spec: StepSpec, samples: list[dict[str, np.ndarray]] | None) -> bytes:
    import tensorflow as tf

    step = make_step_function(spec)
    module = tf.Module()
    module.step = step
    with tempfile.TemporaryDirectory(prefix="edgernn-savedmodel-") as tmp:
        tf.saved_model.save(module, tmp, signatures={SIGNATURE_KEY: step})
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=[SIGNATURE_KEY])
        if samples is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: iter(samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        return bytes(converter.convert())


def record_calibration_samples(spec: StepSpec, sequences: Iterable[np.ndarray],
                               max_samples: int = 3000,
                               seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Rolls the float step model over real sequences and records its inputs.

    Each sample is one step's inputs: the normalized frame and the states the float
    model had reached on that sequence, so the int8 state ranges are calibrated on
    states that really occur, not on zeros or noise.

    Args:
        spec: The step model.
        sequences: Normalized sequences, each float32 (frames, features).
        max_samples: Samples kept, drawn evenly at random from all steps.
        seed: For the draw.
    """
    steps = list(roll_float(spec, sequences, keep_inputs=True))
    rng = np.random.default_rng(seed)
    if len(steps) > max_samples:
        keep = np.sort(rng.choice(len(steps), max_samples, replace=False))
        steps = [steps[i] for i in keep]
    return steps


def roll_float(spec: StepSpec, sequences: Iterable[np.ndarray],
               keep_inputs: bool = False) -> Iterator[Any]:
    """Runs the float step model (numpy) over sequences from a zero state each.

    Yields, per frame, the inputs dict (``keep_inputs``) or the outputs dict.
    """
    for sequence in sequences:
        states = spec.zero_states()
        for frame in np.asarray(sequence, np.float32):
            inputs = {FRAME_INPUT: frame[None, :], **states}
            out = run_stages(NUMPY_OPS, spec, frame[None, :], states)
            states = {s.name: out[s.output_name].astype(np.float32)
                      for s in spec.states}
            yield inputs if keep_inputs else out


def host_runtime() -> Runtime:
    """The TFLite runtime to use in a process that has imported TensorFlow.

    ``tflite_runtime`` 2.14 loaded beside TensorFlow 2.21 fails to read signatures
    ("vector::reserve": two copies of TFLite in one process), so the host uses
    ``ai_edge_litert``, or TensorFlow's own interpreter when that is missing.
    """
    try:
        return import_runtime("ai_edge_litert")
    except RuntimeUnavailableError:
        import tensorflow as tf

        return Runtime("tensorflow.lite", tf.__version__, tf.lite.Interpreter,
                       tf.lite.experimental.load_delegate)


def host_interpreter(model: bytes) -> Any:
    """An interpreter for ``.tflite`` bytes in the host process."""
    return make_interpreter(model, runtime=host_runtime())


def bind_tensors(model: bytes) -> dict[str, str]:
    """Maps each signature name (``frame``, ``scores``, states) to its tensor name."""
    interpreter = host_interpreter(model)
    signature = interpreter._get_full_signature_list()[SIGNATURE_KEY]
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    binding = {}
    for key in ("inputs", "outputs"):
        for sig_name, index in signature[key].items():
            binding[sig_name] = names[index]
    return binding


def tensor_quantization(model: bytes, tensor_name: str) -> Quantization:
    """The int8 quantization of a named tensor."""
    interpreter = host_interpreter(model)
    for d in interpreter.get_tensor_details():
        if d["name"] == tensor_name:
            scale, zero_point = d["quantization"]
            return Quantization(float(scale), int(zero_point))
    raise KeyError(tensor_name)


def share_state_quantization(model: bytes, pairs: list[tuple[str, str]]) -> bytes:
    """Gives each state input the quantization of its state output.

    Args:
        model: An int8 model.
        pairs: (input tensor name, output tensor name) per state.

    Returns:
        The rewritten model. See the module docstring for why this is exact.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    subgraph = tree.subgraphs[0]
    by_name = {_name(t.name): t for t in subgraph.tensors}
    for input_name, output_name in pairs:
        source = by_name[output_name].quantization
        target = by_name[input_name].quantization
        target.scale = list(source.scale)
        target.zeroPoint = list(source.zeroPoint)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _name(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def tool_versions() -> dict[str, str]:
    """Versions of what builds the models, for the manifest."""
    import tensorflow as tf

    from edgernnd import __version__

    runtime = host_runtime()
    return {"edgernn": __version__, "tensorflow": tf.__version__,
            "numpy": np.__version__, runtime.name: runtime.version,
            "python": platform.python_version()}
