"""A static check of an int8 ``.tflite`` step model for the Coral Edge TPU.

The check reads the model's flatbuffer only (no interpreter, no TensorFlow runtime)
and lists what would stop ``edgetpu_compiler`` from putting the whole model on the
Edge TPU: operators outside the documented set, tensors that are not int8, dynamic
shapes, tensors with more than three non-trivial dimensions, and more than one
subgraph (which means control flow such as a WHILE loop over time steps). A clean
report is necessary, not sufficient: only the compiler itself knows its per-version
limits (see :mod:`edgernn.compile`).

The facts used here come from Coral's "TensorFlow models on the Edge TPU" page
(https://coral.ai/docs/edgetpu/models-intro/, sections "Model requirements" and
"Supported operations"):

* tensor parameters and activations are 8-bit quantized (int32 only for biases and
  constant shape-like parameters, which the compiler folds);
* tensor sizes are constant at compile time;
* tensors are 1-, 2- or 3-dimensional; a tensor with more dimensions may have only
  its 3 innermost dimensions larger than 1 (the compiler otherwise reports
  "Tensor has unsupported rank (up to 3 innermost dimensions mapped)");
* the model uses only operations from the supported table.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgernnd.errors import ManifestError, RuntimeUnavailableError

logger = logging.getLogger(__name__)

# The operators edgernn's step models are built from (the recurrent cell, the
# classifier head and the int8 requantization between them).
STEP_MODEL_OPS = frozenset(
    {
        "FULLY_CONNECTED",
        "ADD",
        "SUB",
        "MUL",
        "TANH",
        "LOGISTIC",
        "CONCATENATION",
        "RESHAPE",
        "SOFTMAX",
        "QUANTIZE",
    }
)

# Every operation in the "Supported operations" table of Coral's models-intro page
# (https://coral.ai/docs/edgetpu/models-intro/#supported-operations), as TFLite
# builtin operator names. Per-op limits from that table that matter for edgernn are
# checked below (SOFTMAX, FULLY_CONNECTED, QUANTIZE); the others (e.g. MEAN and PAD
# only along x/y, CONCATENATION without fused activation) are left to the compiler.
EDGETPU_OPS = STEP_MODEL_OPS | frozenset(
    {
        "AVERAGE_POOL_2D",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "L2_NORMALIZATION",
        "LSTM",  # Unidirectional only; edgernn unrolls cells itself.
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "PACK",
        "PAD",
        "PRELU",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUM",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
    }
)

_CONTROL_FLOW_OPS = frozenset({"WHILE", "IF", "CALL", "CALL_ONCE"})
_VARIABLE_OPS = frozenset({"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"})

# Operator -> input positions that may hold int32: biases (accumulated in int32 by
# every int8 kernel) and constant shape-like parameters (shapes, axes, paddings,
# slice bounds, permutations) that the compiler folds into the program.
_INT32_INPUTS: dict[str, frozenset[int]] = {
    "FULLY_CONNECTED": frozenset({2}),
    "CONV_2D": frozenset({2}),
    "DEPTHWISE_CONV_2D": frozenset({2}),
    "TRANSPOSE_CONV": frozenset({0, 3}),
    "RESHAPE": frozenset({1}),
    "EXPAND_DIMS": frozenset({1}),
    "MEAN": frozenset({1}),
    "SUM": frozenset({1}),
    "REDUCE_MAX": frozenset({1}),
    "REDUCE_MIN": frozenset({1}),
    "PAD": frozenset({1}),
    "SLICE": frozenset({1, 2}),
    "STRIDED_SLICE": frozenset({1, 2, 3}),
    "TRANSPOSE": frozenset({1}),
    "SPLIT": frozenset({0}),
    "RESIZE_BILINEAR": frozenset({1}),
    "RESIZE_NEAREST_NEIGHBOR": frozenset({1}),
}

# Coral's table: SOFTMAX "supports only 1-D input tensor with a max of 16,000
# elements".
_SOFTMAX_MAX_ELEMENTS = 16_000

# The Edge TPU maps at most this many innermost dimensions larger than 1.
MAX_MAPPED_DIMS = 3

# Problems of one kind listed one per line before the rest are summed up in one.
_MAX_LINES_PER_KIND = 10


class OpInfo(NamedTuple):
    """One operator kind used by the model.

    Attributes:
        name: TFLite builtin name (``FULLY_CONNECTED``), or ``CUSTOM:<code>``.
        version: The operator version recorded in the model; the Edge TPU compiler
            rejects versions newer than it knows ("Operation version not supported").
        count: How many operators of this name and version, over all subgraphs.
    """

    name: str
    version: int
    count: int


@dataclasses.dataclass
class EdgeTpuReport:
    """The result of :func:`check_model`.

    Attributes:
        ok: True when no problem was found.
        subgraphs: Number of subgraphs in the model (1 for a model without control
            flow).
        operators: Operator kinds in order of first use.
        problems: One line per problem, each naming the operator or tensor.
    """

    ok: bool
    subgraphs: int
    operators: list[OpInfo]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: keys ok, subgraphs, operators (list of
        {name, version, count}) and problems (list of str)."""
        return {
            "ok": self.ok,
            "subgraphs": self.subgraphs,
            "operators": [op._asdict() for op in self.operators],
            "problems": list(self.problems),
        }


def check_model(path_or_bytes: str | os.PathLike | bytes | bytearray) -> EdgeTpuReport:
    """Check a ``.tflite`` model for Edge TPU readiness without running it.

    Args:
        path_or_bytes: A .tflite file, or its contents.

    Returns:
        The report; ``ok`` is False when any problem was found.

    Raises:
        ManifestError: The file is missing or is not a TFLite flatbuffer.
        RuntimeUnavailableError: No TFLite schema module is installed (it ships
            with TensorFlow and with ai-edge-litert).
    """
    model = _read_model(path_or_bytes)
    schema = load_schema()
    op_names = _builtin_op_names(schema)
    type_names = _tensor_type_names(schema)

    problems: dict[str, list[str]] = {}

    def add(kind: str, line: str) -> None:
        problems.setdefault(kind, []).append(line)

    subgraphs = list(model.subgraphs or [])
    if len(subgraphs) > 1:
        add(
            "subgraphs",
            f"more than one subgraph ({len(subgraphs)}): the model has control flow; "
            "export a single-step model without a loop over time",
        )

    buffers = list(model.buffers or [])
    counts: dict[tuple[str, int], int] = {}
    codes = list(model.operatorCodes or [])
    for sg_index, subgraph in enumerate(subgraphs):
        tensors = list(subgraph.tensors or [])
        int32_ok: set[int] = set()

        for op_index, op in enumerate(subgraph.operators or []):
            code = codes[op.opcodeIndex]
            name = _op_name(code, op_names)
            key = (name, int(code.version or 1))
            counts[key] = counts.get(key, 0) + 1
            where = (
                f"op #{op_index}"
                if sg_index == 0
                else f"subgraph {sg_index} op #{op_index}"
            )
            inputs = _indices(op.inputs)
            outputs = _indices(op.outputs)

            for position in _INT32_INPUTS.get(name, ()):
                if position < len(inputs) and inputs[position] >= 0:
                    int32_ok.add(inputs[position])

            problem = _check_operator(name, where, inputs, outputs, tensors, type_names)
            if problem:
                add("operators", problem)

        for t_index, tensor in enumerate(tensors):
            for kind, line in _check_tensor(
                tensor, t_index in int32_ok, buffers, type_names
            ):
                add(kind, line if sg_index == 0 else f"subgraph {sg_index}: {line}")

    lines = []
    for kind, found in problems.items():
        lines.extend(found[:_MAX_LINES_PER_KIND])
        if len(found) > _MAX_LINES_PER_KIND:
            lines.append(
                f"... and {len(found) - _MAX_LINES_PER_KIND} more {kind} problems"
            )

    operators = [OpInfo(name, version, n) for (name, version), n in counts.items()]
    report = EdgeTpuReport(
        ok=not lines, subgraphs=len(subgraphs), operators=operators, problems=lines
    )
    logger.debug("Edge TPU check: %d problems, operators %s", len(lines), operators)
    return report


def _check_operator(
    name: str,
    where: str,
    inputs: list[int],
    outputs: list[int],
    tensors: list[Any],
    type_names: dict[int, str],
) -> str | None:
    """One line describing why this operator will not map, or None."""
    if name in _CONTROL_FLOW_OPS:
        return f"{name} ({where}): control flow does not map to the Edge TPU"
    if name in _VARIABLE_OPS:
        return (
            f"{name} ({where}): resource variables do not map to the Edge TPU; pass "
            "the state in as an input and out as an output"
        )
    if name.startswith("CUSTOM:"):
        return f"{name} ({where}): custom and Flex operators never map to the Edge TPU"
    if name == "DEQUANTIZE":
        return (
            f"DEQUANTIZE ({where}): the int8 -> float conversion runs on the CPU; "
            "convert with inference_output_type=tf.int8"
        )
    if name not in EDGETPU_OPS:
        return (
            f"{name} ({where}): not an Edge TPU operation (see the supported table at "
            "coral.ai/docs/edgetpu/models-intro)"
        )

    def dtype_of(index: int) -> str:
        return type_names.get(tensors[index].type, "?") if index >= 0 else "none"

    if name == "QUANTIZE" and inputs and outputs:
        source, target = dtype_of(inputs[0]), dtype_of(outputs[0])
        if (source, target) != ("INT8", "INT8"):
            return (
                f"QUANTIZE ({where}): {source} -> {target}; only an int8 -> int8 "
                "requantization maps (convert with inference_input_type=tf.int8)"
            )
    if name == "SOFTMAX" and inputs and inputs[0] >= 0:
        shape = _shape(tensors[inputs[0]])
        if _count_large_dims(shape) > 1 or int(np.prod(shape)) > _SOFTMAX_MAX_ELEMENTS:
            return (
                f"SOFTMAX ({where}): input shape {shape} but the Edge TPU takes only a "
                f"1-D input of at most {_SOFTMAX_MAX_ELEMENTS} elements"
            )
    if name == "FULLY_CONNECTED" and outputs and outputs[0] >= 0:
        shape = _shape(tensors[outputs[0]])
        if _count_large_dims(shape) > 1:
            return (
                f"FULLY_CONNECTED ({where}): output shape {shape} but the Edge TPU "
                "needs a one-dimensional output (batch 1, one time step)"
            )
    return None


def _check_tensor(
    tensor: Any, int32_allowed: bool, buffers: list[Any], type_names: dict[int, str]
) -> Iterator[tuple[str, str]]:
    """Yield (kind, line) for every problem of one tensor."""
    name = _text(tensor.name)
    dtype = type_names.get(tensor.type, f"type {tensor.type}")
    constant = _is_constant(tensor, buffers)

    if dtype == "INT32":
        if not int32_allowed:
            yield (
                "dtype",
                f"tensor {name!r} is INT32; the Edge TPU allows int32 only for biases "
                "and constant shape parameters",
            )
        elif not constant:
            yield (
                "dtype",
                f"tensor {name!r} is an INT32 parameter computed at run time; it must "
                "be a constant (a dynamic shape or axis does not map)",
            )
    elif dtype != "INT8":
        yield (
            "dtype",
            f"tensor {name!r} is {dtype}; the Edge TPU runs only int8 tensors "
            "(quantize the whole model, int8 inputs and outputs included)",
        )

    signature = _indices(tensor.shapeSignature)
    shape = _shape(tensor)
    if any(dim < 0 for dim in signature) or any(dim < 0 for dim in shape):
        yield (
            "shape",
            f"tensor {name!r} has dynamic shape (shape_signature has -1): "
            f"{signature or shape}; fix every dimension, batch included",
        )
    if len(shape) > MAX_MAPPED_DIMS and any(d > 1 for d in shape[:-MAX_MAPPED_DIMS]):
        yield (
            "rank",
            f"tensor {name!r} has shape {shape}: only the {MAX_MAPPED_DIMS} innermost "
            "dimensions may be larger than 1 on the Edge TPU",
        )


@functools.cache
def load_schema() -> types.ModuleType:
    """The TFLite flatbuffer schema module (object API), without importing TF.

    TensorFlow's own ``tensorflow/lite/python/schema_py_generated.py`` is loaded
    straight from its file, because importing it the usual way imports all of
    TensorFlow (seconds) for a module that needs only ``flatbuffers``. The copy in
    ai-edge-litert serves where TensorFlow is absent.

    Raises:
        RuntimeUnavailableError: Neither TensorFlow nor ai-edge-litert is installed.
    """
    spec = importlib.util.find_spec("tensorflow")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "lite" / "python" / "schema_py_generated.py"
            if candidate.is_file():
                file_spec = importlib.util.spec_from_file_location(
                    "edgernn._tflite_schema", candidate
                )
                if file_spec is not None and file_spec.loader is not None:
                    module = importlib.util.module_from_spec(file_spec)
                    file_spec.loader.exec_module(module)
                    return module
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as error:
        raise RuntimeUnavailableError(
            "no TFLite flatbuffer schema found: install the host tools' TensorFlow "
            "(pip install 'edgernn[host]') or ai-edge-litert"
        ) from error
    return schema_py_generated


def _read_model(path_or_bytes: str | os.PathLike | bytes | bytearray) -> Any:
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
        label = "model bytes"
    else:
        label = str(path_or_bytes)
        try:
            data = Path(path_or_bytes).read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"no such model file: {label!r}") from None
        except OSError as error:
            raise ManifestError(f"cannot read model {label!r}: {error}") from error
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ManifestError(
            f"{label!r} is not a TFLite model (no 'TFL3' identifier); give the "
            ".tflite file the converter wrote"
        )
    schema = load_schema()
    try:
        return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    except Exception as error:  # flatbuffers raises bare struct/index errors
        raise ManifestError(
            f"{label!r} is a corrupt TFLite model: {error!r}"
        ) from error


def _builtin_op_names(schema: types.ModuleType) -> dict[int, str]:
    return {
        value: key
        for key, value in vars(schema.BuiltinOperator).items()
        if not key.startswith("_") and isinstance(value, int)
    }


def _tensor_type_names(schema: types.ModuleType) -> dict[int, str]:
    return {
        value: key
        for key, value in vars(schema.TensorType).items()
        if not key.startswith("_") and isinstance(value, int)
    }


def _op_name(code: Any, op_names: dict[int, str]) -> str:
    # Operators numbered above 127 live in builtinCode only; older files keep the
    # code in deprecatedBuiltinCode. The larger of the two is the real one.
    number = max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))
    name = op_names.get(number, f"BUILTIN_{number}")
    if name == "CUSTOM":
        return f"CUSTOM:{_text(code.customCode)}"
    return name


def _is_constant(tensor: Any, buffers: list[Any]) -> bool:
    if not tensor.buffer or tensor.buffer >= len(buffers):
        return False
    buffer = buffers[tensor.buffer]
    has_data = buffer.data is not None and len(buffer.data) > 0
    return has_data or bool(buffer.size)


def _shape(tensor: Any) -> list[int]:
    return _indices(tensor.shape)


def _indices(values: Any) -> list[int]:
    if values is None:
        return []
    return [int(v) for v in values]


def _count_large_dims(shape: list[int]) -> int:
    return sum(1 for dim in shape if dim > 1)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
