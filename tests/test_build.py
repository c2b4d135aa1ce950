"""Export, int8 quantization and the model folder, on real conversions.

Each model is converted by TensorFlow's converter and run by a real TFLite
interpreter (ai-edge-litert, the one that loads beside TensorFlow).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from edgernn import build  # noqa: E402
from edgernn.convert import host_runtime  # noqa: E402
from edgernn.edgetpu_check import check_model  # noqa: E402
from edgernnd.manifest import load_manifest  # noqa: E402
from edgernnd.runner import StepRunner  # noqa: E402

FEATURES, CLASSES = 6, 4


def _data(count=12, frames=40, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth random walks, like sensor channels, with channel-dependent ranges.
    steps = rng.normal(0, 0.3, (count, frames, FEATURES)).cumsum(axis=1)
    return [(s * np.arange(1, FEATURES + 1)).astype(np.float32) for s in steps]


def _quantized_folder(model, tmp_path, sequences):
    export = build.export_model(model)
    models = build.quantize_export(export, sequences, max_samples=400)
    labels = tuple(f"c{i}" for i in range(CLASSES))
    build.write_models(tmp_path, export, models, labels, "test", 40)
    return load_manifest(tmp_path), models


CELLS = {
    "simplernn": lambda: keras.layers.SimpleRNN(16),
    "gru": lambda: keras.layers.GRU(16),
    "gru_reset_before": lambda: keras.layers.GRU(16, reset_after=False),
    "lstm": lambda: keras.layers.LSTM(16),
}


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_quantize_export_int8_model_shares_state_quantization(cell, tmp_path):
    model = keras.Sequential([keras.Input((None, FEATURES)),
                              keras.layers.Normalization(mean=0.0, variance=9.0),
                              CELLS[cell](),
                              keras.layers.Dense(CLASSES, activation="softmax")])
    sequences = _data()
    manifest, models = _quantized_folder(model, tmp_path, sequences)

    assert all(s.shared for s in manifest.states)
    assert len(manifest.states) == (2 if cell == "lstm" else 1)
    # The leading Normalization moved into the manifest.
    np.testing.assert_allclose(manifest.std, [3.0] * FEATURES, rtol=1e-5)

    report = check_model(models.int8_model)
    assert report.ok, report.problems
    assert report.subgraphs == 1

    runtime = host_runtime()
    int8 = StepRunner(manifest, "int8", runtime)
    float32 = StepRunner(manifest, "float32", runtime)
    assert int8.quantized and not float32.quantized
    agree = []
    for sequence in _data(count=4, seed=1):
        f, q = float32.run_sequence(sequence), int8.run_sequence(sequence)
        assert np.max(np.abs(f - q)) < 0.25
        agree.append(f.argmax(1) == q.argmax(1))
    assert np.mean(agree) > 0.8


def test_classic_stateful_recipe_exports_where_direct_conversion_cannot_map(tmp_path):
    inputs = keras.Input(batch_shape=(1, None, FEATURES))
    x, _state = keras.layers.SimpleRNN(16, stateful=True, return_state=True)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))

    direct = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    direct_report = check_model(direct)
    assert not direct_report.ok
    assert direct_report.subgraphs > 1
    assert {"WHILE", "VAR_HANDLE"} <= {op.name for op in direct_report.operators}

    manifest, models = _quantized_folder(model, tmp_path, _data())
    assert check_model(models.int8_model).ok
    runner = StepRunner(manifest, "int8", host_runtime())
    scores = runner.run_sequence(_data(count=1, seed=3)[0])
    assert scores.shape == (40, CLASSES)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=0.05)


def test_default_build_meets_int8_acceptance_figures(basicmotions_model):
    report = json.loads((basicmotions_model / "verify" / "report.json").read_text())
    agreement = report["int8_vs_float"]
    assert agreement["top1_agreement_last_step"] >= 0.97
    assert agreement["top1_agreement_per_step"] >= 0.95
    accuracy = report["accuracy_last_step"]
    assert accuracy["int8"] >= accuracy["float32"] - 0.025
    assert accuracy["float32"] >= 0.85
    assert report["keras_vs_float_max_abs"] < 1e-4
    drift = report["drift"]
    assert drift["steps"] >= 100_000 and not drift["nan"] and drift["bounded"]
    assert drift["saturated_fraction"] < 0.5
    static = report["edgetpu_static_check"]
    assert static["ok"] and static["subgraphs"] == 1
    mappable = {"FULLY_CONNECTED", "ADD", "SUB", "MUL", "TANH", "LOGISTIC",
                "CONCATENATION", "RESHAPE", "SOFTMAX"}
    assert {op["name"] for op in static["operators"]} <= mappable
    assert (basicmotions_model / "verify" / "agreement.png").stat().st_size > 1000
    assert (basicmotions_model / "verify" / "drift.png").stat().st_size > 1000


def test_write_model_folder_leaves_nothing_when_filling_fails(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous build")

    def fail(folder):
        (folder / "half.tflite").write_bytes(b"partial")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        build.write_model_folder(out, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_train_classifier_is_repeatable_with_a_seed():
    from edgernn.train import TrainSettings, train_classifier

    sequences = _data(count=8, frames=20)
    labels = np.arange(8) % CLASSES
    settings = TrainSettings(cell="gru", units=8, epochs=2, seed=3)
    first = train_classifier(sequences, labels, CLASSES, settings, progress=False)
    second = train_classifier(sequences, labels, CLASSES, settings, progress=False)
    other = train_classifier(sequences, labels, CLASSES,
                             TrainSettings(cell="gru", units=8, epochs=2, seed=4),
                             progress=False)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)
               for a, b in zip(first.get_weights(), other.get_weights()))


def test_build_reuse_rebuilds_a_damaged_folder(basicmotions_model, tmp_path, capsys):
    import shutil

    from edgernn.cli import main

    folder = tmp_path / "model"
    shutil.copytree(basicmotions_model, folder)
    assert main(["build", "--data", "basicmotions", "--out", str(folder),
                 "--reuse", "--drift-steps", "100000"]) == 0
    assert "reusing" in capsys.readouterr().out
    with open(folder / "step_int8.tflite", "ab") as f:
        f.write(b"\0")
    assert main(["build", "--data", "basicmotions", "--out", str(folder),
                 "--reuse", "--drift-steps", "100000"]) == 0
    captured = capsys.readouterr()
    assert "not reusing" in captured.err and "reusing" not in captured.out
    assert load_manifest(folder)  # rebuilt whole: every sha256 matches again
