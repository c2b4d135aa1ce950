"""The step model rolled one frame at a time equals the Keras model on every prefix."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edgernn.step_model import (  # noqa: E402
    NUMPY_OPS,
    SCORES_OUTPUT,
    describe_model,
    make_step_function,
    run_stages,
)
from edgernnd.errors import ModelError  # noqa: E402

FEATURES, FRAMES, CLASSES = 5, 12, 3
TOLERANCE = 1e-4


def _sequential(*layers):
    model = keras.Sequential([keras.Input((None, FEATURES)), *layers])
    # Random non-zero biases, so that a bias read into the wrong gate shows.
    rng = np.random.default_rng(7)
    model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def _head():
    return keras.layers.Dense(CLASSES, activation="softmax")


MODELS = {
    "simplernn": lambda: _sequential(keras.layers.SimpleRNN(8), _head()),
    "gru_reset_after": lambda: _sequential(keras.layers.GRU(8, reset_after=True),
                                           _head()),
    "gru_reset_before": lambda: _sequential(keras.layers.GRU(8, reset_after=False),
                                            _head()),
    "lstm": lambda: _sequential(keras.layers.LSTM(8), _head()),
    "stack_sequences": lambda: _sequential(
        keras.layers.Normalization(mean=0.5, variance=4.0),
        keras.layers.GRU(8, return_sequences=True),
        keras.layers.Dropout(0.2),
        keras.layers.LSTM(6, return_sequences=True),
        keras.layers.Dense(7, activation="relu"),
        _head()),
    "stack_last": lambda: _sequential(
        keras.layers.Rescaling(0.5, offset=0.1),
        keras.layers.SimpleRNN(8, return_sequences=True),
        keras.layers.SimpleRNN(6),
        _head()),
}


def _keras_prefix_outputs(model, sequence):
    """Keras output after each prefix of the sequence: (frames, classes)."""
    out = []
    for t in range(1, len(sequence) + 1):
        y = model(sequence[None, :t], training=False)
        y = np.asarray(y)
        out.append(y[0, -1] if y.ndim == 3 else y[0])
    return np.stack(out)


def _roll(step, spec, sequence):
    states = spec.zero_states()
    scores = []
    for frame in sequence:
        out = step(frame[None], states)
        scores.append(np.asarray(out[SCORES_OUTPUT])[0])
        states = {s.name: np.asarray(out[s.output_name]) for s in spec.states}
    return np.stack(scores)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_model_equals_keras_on_every_prefix(name):
    model = MODELS[name]()
    spec = describe_model(model)
    sequence = np.random.default_rng(1).normal(0, 1.5, (FRAMES, FEATURES))
    sequence = sequence.astype(np.float32)
    expected = _keras_prefix_outputs(model, sequence)

    tf_fn = make_step_function(spec)
    via_tf = _roll(lambda f, s: tf_fn(f, *s.values()), spec, sequence)
    via_numpy = _roll(lambda f, s: run_stages(NUMPY_OPS, spec, f, s), spec, sequence)

    assert np.max(np.abs(via_tf - expected)) < TOLERANCE
    assert np.max(np.abs(via_numpy - expected)) < TOLERANCE
    # The scores move from frame to frame: the state really carries history.
    assert np.max(np.abs(np.diff(expected, axis=0))) > 1e-3


def test_describe_model_names_states_per_layer():
    spec = describe_model(MODELS["stack_sequences"]())
    assert [s.name for s in spec.states][-2:] != []
    kinds = [(s.layer, s.size) for s in spec.states]
    assert len(kinds) == 3  # GRU h, LSTM h and c
    assert spec.cells == ["gru", "lstm"]
    assert spec.states[1].name.endswith("_h") and spec.states[2].name.endswith("_c")


def test_describe_model_adds_softmax_to_logits():
    model = _sequential(keras.layers.GRU(4), keras.layers.Dense(CLASSES))
    spec = describe_model(model)
    assert spec.softmax_added and spec.output_activation == "softmax"


@pytest.mark.parametrize("layer, words", [
    (lambda: keras.layers.Bidirectional(keras.layers.GRU(4)), "Bidirectional"),
    (lambda: keras.layers.GRU(4, go_backwards=True), "go_backwards"),
    (lambda: keras.layers.Conv1D(4, 3), "Conv1D"),
])
def test_describe_model_rejects_layers_that_cannot_stream(layer, words):
    model = _sequential(layer(), _head()) if words != "Conv1D" else _sequential(
        layer(), keras.layers.GRU(4), _head())
    with pytest.raises(ModelError, match=words):
        describe_model(model)


def test_describe_model_rejects_model_without_recurrent_layer():
    model = _sequential(keras.layers.Dense(4), _head())
    with pytest.raises(ModelError, match="no recurrent layer"):
        describe_model(model)
