"""Tests for edgernn.edgetpu_check.

Real models come from the TensorFlow Lite converter (a quantized step-like
function, a Keras SimpleRNN); corner cases are flatbuffers built here with the
TFLite schema's object API, so each problem is produced on purpose.
"""

from __future__ import annotations

import json

import flatbuffers
import numpy as np
import pytest

from edgernn.edgetpu_check import EDGETPU_OPS, STEP_MODEL_OPS, check_model, load_schema
from edgernnd.errors import ManifestError

FEATURES = 6
UNITS = 8
CLASSES = 4

# The converter warns that int8 inputs come without statistics; they need none here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Statistics for quantized inputs:UserWarning"
)


# ------------------------------------------------------------ converter models


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def representative_data():
    rng = np.random.default_rng(0)
    for _ in range(32):
        yield [
            rng.normal(size=(1, FEATURES)).astype(np.float32),
            rng.uniform(-1, 1, size=(1, UNITS)).astype(np.float32),
        ]


def convert_step_function(tf, int8_io: bool, batch: int | None = 1) -> bytes:
    """A SimpleRNN-like step: h' = tanh(x Wx + h Wh + b), scores = softmax(h' Wo + bo),
    converted to full-int8 TFLite."""
    rng = np.random.default_rng(1)
    wx = rng.normal(size=(FEATURES, UNITS)).astype(np.float32)
    wh = rng.normal(size=(UNITS, UNITS)).astype(np.float32) * 0.3
    b = rng.normal(size=(UNITS,)).astype(np.float32)
    wo = rng.normal(size=(UNITS, CLASSES)).astype(np.float32)
    bo = rng.normal(size=(CLASSES,)).astype(np.float32)

    @tf.function(
        input_signature=[
            tf.TensorSpec([batch, FEATURES], tf.float32, name="frame"),
            tf.TensorSpec([batch, UNITS], tf.float32, name="state"),
        ]
    )
    def step(frame, state):
        new_state = tf.tanh(tf.matmul(frame, wx) + tf.matmul(state, wh) + b)
        return tf.nn.softmax(tf.matmul(new_state, wo) + bo), new_state

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [step.get_concrete_function()], step
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_data
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.fixture(scope="module")
def int8_step_model(tf) -> bytes:
    return convert_step_function(tf, int8_io=True)


def test_check_model_full_int8_step_function_is_ok(int8_step_model, tmp_path):
    path = tmp_path / "step.tflite"
    path.write_bytes(int8_step_model)

    report = check_model(path)

    assert report.problems == []
    assert report.ok is True
    assert report.subgraphs == 1
    names = {op.name for op in report.operators}
    assert {"FULLY_CONNECTED", "TANH", "SOFTMAX"} <= names
    assert names <= STEP_MODEL_OPS
    assert all(op.version >= 1 and op.count >= 1 for op in report.operators)


def test_check_model_allows_int32_bias_of_fully_connected(int8_step_model):
    schema = load_schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(int8_step_model, 0))
    types = {t.type for t in model.subgraphs[0].tensors}

    # The check passed above although the converter stored int32 biases.
    assert schema.TensorType.INT32 in types
    assert check_model(int8_step_model).ok


def test_check_model_to_dict_is_json_ready(int8_step_model):
    data = json.loads(json.dumps(check_model(int8_step_model).to_dict()))

    assert data["ok"] is True
    assert data["subgraphs"] == 1
    assert {"name", "version", "count"} == set(data["operators"][0])


def test_check_model_float_io_reports_quantize_and_dequantize(tf):
    report = check_model(convert_step_function(tf, int8_io=False))

    assert not report.ok
    text = "\n".join(report.problems)
    assert "QUANTIZE (op #" in text and "FLOAT32 -> INT8" in text
    assert "DEQUANTIZE (op #" in text
    assert "is FLOAT32" in text  # the float input/output tensors themselves


def test_check_model_dynamic_batch_reports_shape_signature(tf):
    report = check_model(convert_step_function(tf, int8_io=True, batch=None))

    assert any(
        "'frame' has dynamic shape (shape_signature has -1)" in line
        for line in report.problems
    ), report.problems


def test_check_model_keras_simple_rnn_reports_while_and_float(tf):
    keras = tf.keras
    model = keras.Sequential(
        [
            keras.Input((None, FEATURES), batch_size=1),
            keras.layers.SimpleRNN(UNITS),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    tflite = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    report = check_model(tflite)

    assert not report.ok
    assert report.subgraphs > 1
    assert report.problems[0].startswith(
        f"more than one subgraph ({report.subgraphs}): the model has control flow"
    )
    assert any(
        line.startswith("WHILE (op #") and "control flow" in line
        for line in report.problems
    )
    assert any("is FLOAT32" in line for line in report.problems)
    assert "WHILE" in {op.name for op in report.operators}


# ------------------------------------------------------- hand-built flatbuffers


def build_model(ops, tensors, subgraphs=1, buffers=None) -> bytes:
    """A minimal TFLite flatbuffer.

    Args:
        ops: List of (builtin name or "CUSTOM:code", input indices, output indices).
        tensors: List of (name, type name, shape) or (name, type name, shape,
            shape_signature, buffer index).
        subgraphs: Copies of the subgraph to store (more than one fakes control flow).
        buffers: Buffer contents (bytes) after the mandatory empty buffer 0.
    """
    schema = load_schema()
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    for content in buffers or []:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(content, dtype=np.uint8)
        model.buffers.append(buffer)

    codes: dict[str, int] = {}
    model.operatorCodes = []
    graph_ops = []
    for name, inputs, outputs in ops:
        if name not in codes:
            code = schema.OperatorCodeT()
            builtin = "CUSTOM" if name.startswith("CUSTOM:") else name
            number = getattr(schema.BuiltinOperator, builtin)
            code.builtinCode = number
            code.deprecatedBuiltinCode = min(number, 127)
            code.version = 1
            if builtin == "CUSTOM":
                code.customCode = name.split(":", 1)[1].encode()
            codes[name] = len(model.operatorCodes)
            model.operatorCodes.append(code)
        op = schema.OperatorT()
        op.opcodeIndex = codes[name]
        op.inputs = list(inputs)
        op.outputs = list(outputs)
        graph_ops.append(op)

    graph_tensors = []
    for spec in tensors:
        name, type_name, shape = spec[:3]
        tensor = schema.TensorT()
        tensor.name = name.encode()
        tensor.type = getattr(schema.TensorType, type_name)
        tensor.shape = list(shape)
        if len(spec) > 3 and spec[3] is not None:
            tensor.shapeSignature = list(spec[3])
        tensor.buffer = spec[4] if len(spec) > 4 else 0
        graph_tensors.append(tensor)

    model.subgraphs = []
    for _ in range(subgraphs):
        graph = schema.SubGraphT()
        graph.tensors = graph_tensors
        graph.operators = graph_ops
        graph.inputs = [0]
        graph.outputs = [len(graph_tensors) - 1]
        model.subgraphs.append(graph)

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_check_model_hand_built_clean_cell_is_ok():
    data = build_model(
        [
            ("FULLY_CONNECTED", [0, 1, 2], [3]),
            ("RESHAPE", [3, 4], [5]),
            ("TANH", [5], [6]),
        ],
        [
            ("x", "INT8", [1, 4]),
            ("w", "INT8", [8, 4], None, 1),
            ("bias", "INT32", [8], None, 2),
            ("fc", "INT8", [1, 8]),
            ("new_shape", "INT32", [2], None, 3),
            ("reshaped", "INT8", [1, 8]),
            ("h", "INT8", [1, 8]),
        ],
        buffers=[bytes(32), bytes(32), np.array([1, 8], np.int32).tobytes()],
    )

    report = check_model(data)

    assert report.problems == []
    assert [op.name for op in report.operators] == [
        "FULLY_CONNECTED",
        "RESHAPE",
        "TANH",
    ]


def test_check_model_reports_int32_outside_bias_and_runtime_shapes():
    data = build_model(
        [("ADD", [0, 1], [2]), ("RESHAPE", [2, 3], [4])],
        [
            ("x", "INT8", [1, 8]),
            ("counter", "INT32", [1, 8], None, 1),
            ("sum", "INT8", [1, 8]),
            ("shape_at_run_time", "INT32", [2]),
            ("y", "INT8", [1, 8]),
        ],
        buffers=[bytes(32)],
    )

    problems = check_model(data).problems

    assert any(line.startswith("tensor 'counter' is INT32") for line in problems)
    assert any(
        "'shape_at_run_time' is an INT32 parameter computed at run time" in line
        for line in problems
    )


def test_check_model_reports_rank_beyond_three_innermost_dims():
    data = build_model(
        [("TANH", [0], [1])],
        [("x", "INT8", [1, 2, 3, 4]), ("y", "INT8", [1, 1, 1, 2, 3, 4])],
    )
    wide = build_model(
        [("TANH", [0], [1])],
        [("x", "INT8", [2, 2, 3, 4]), ("y", "INT8", [2, 2, 3, 4])],
    )

    # Leading dimensions of size 1 are fine, whatever the rank.
    assert check_model(data).ok
    problems = check_model(wide).problems
    assert len(problems) == 2
    assert problems[0] == (
        "tensor 'x' has shape [2, 2, 3, 4]: only the 3 innermost dimensions may be "
        "larger than 1 on the Edge TPU"
    )


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("WHILE", "WHILE (op #0): control flow does not map to the Edge TPU"),
        ("GATHER", "GATHER (op #0): not an Edge TPU operation"),
        ("VAR_HANDLE", "VAR_HANDLE (op #0): resource variables do not map"),
        (
            "CUSTOM:FlexTensorListReserve",
            "CUSTOM:FlexTensorListReserve (op #0): custom",
        ),
    ],
)
def test_check_model_reports_unmappable_operator(op, expected):
    data = build_model([(op, [0], [1])], [("x", "INT8", [1, 8]), ("y", "INT8", [1, 8])])

    report = check_model(data)

    assert not report.ok
    assert report.problems[0].startswith(expected), report.problems
    assert report.operators[0].name == op


def test_check_model_reports_every_subgraph():
    data = build_model(
        [("TANH", [0], [1])],
        [("x", "INT8", [1, 8]), ("y", "FLOAT32", [1, 8])],
        subgraphs=2,
    )

    report = check_model(data)

    assert report.subgraphs == 2
    assert report.problems[0].startswith("more than one subgraph (2)")
    assert "subgraph 1: tensor 'y' is FLOAT32" in report.problems[-1]
    assert report.operators[0].count == 2


def test_check_model_softmax_limit_from_coral_table():
    big = build_model(
        [("SOFTMAX", [0], [1])],
        [("x", "INT8", [1, 16_001]), ("y", "INT8", [1, 16_001])],
    )
    two_d = build_model(
        [("SOFTMAX", [0], [1])], [("x", "INT8", [3, 4]), ("y", "INT8", [3, 4])]
    )
    fine = build_model(
        [("SOFTMAX", [0], [1])],
        [("x", "INT8", [1, 16_000]), ("y", "INT8", [1, 16_000])],
    )

    assert "at most 16000 elements" in check_model(big).problems[0]
    assert "input shape [3, 4]" in check_model(two_d).problems[0]
    assert check_model(fine).ok


def test_check_model_caps_repeated_problems():
    count = 25
    tensors = [(f"t{i}", "FLOAT32", [1, 8]) for i in range(count)]
    ops = [("TANH", [i], [i + 1]) for i in range(count - 1)]

    problems = check_model(build_model(ops, tensors)).problems

    assert len(problems) == 11
    assert problems[-1] == "... and 15 more dtype problems"


def test_check_model_documented_op_list_contains_step_ops():
    assert STEP_MODEL_OPS <= EDGETPU_OPS
    assert "WHILE" not in EDGETPU_OPS and "DEQUANTIZE" not in EDGETPU_OPS


def test_check_model_rejects_non_tflite_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not a TFLite model"):
        check_model(b"\x00" * 64)
    with pytest.raises(ManifestError, match="no such model file"):
        check_model(tmp_path / "absent.tflite")
