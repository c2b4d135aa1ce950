"""Bad input to the edgernn command: one line naming the problem, a non-zero exit,
no traceback, and nothing half-written."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

keras = pytest.importorskip("keras")

from edgernn.cli import main  # noqa: E402

FEATURES = 6


def _save(tmp_path, name, *layers):
    model = keras.Sequential([keras.Input((None, FEATURES)), *layers])
    path = tmp_path / name
    model.save(path)
    return path


@pytest.fixture
def gru_model(tmp_path):
    return _save(tmp_path, "gru.keras", keras.layers.GRU(4),
                 keras.layers.Dense(4, activation="softmax"))


def _cases(tmp_path, gru_model):
    bad_ts = tmp_path / "bad.ts"
    bad_ts.write_text("@problemName x\n@univariate true\n@classLabel true a b\n@data\n"
                      "1,2,3:c\n")
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("a,b,c,d,e,f,label\n")
    dense = _save(tmp_path, "dense.keras", keras.layers.Dense(4, activation="softmax"))
    bidi = _save(tmp_path, "bidi.keras", keras.layers.Bidirectional(keras.layers.GRU(4)),
                 keras.layers.Dense(4, activation="softmax"))
    nan_csv = tmp_path / "nan.csv"
    nan_csv.write_text("a,b,c,d,e,f,label\n" + "1,2,3,4,5,6,x\n" * 3
                       + "1,2,nan,4,5,6,x\n")
    out = tmp_path / "out"
    return {
        "non-finite data": (["quantize", "--model", str(gru_model), "--data",
                             str(nan_csv), "--out", str(out)], "frame 3"),
        "verify missing folder": (["verify", "--dir", str(tmp_path / "nosuch"),
                                   "--data", "basicmotions"], "no manifest"),
        "train unwritable output": (["train", "--data", "basicmotions", "--epochs", "1",
                                     "--out", "/proc/version/m.keras"], "/proc/version"),
        "missing data file": (["train", "--data", str(tmp_path / "nope.ts"),
                               "--epochs", "1", "--out", str(tmp_path / "m.keras")],
                              "nope.ts"),
        "malformed ts": (["train", "--data", str(bad_ts), "--epochs", "1",
                          "--out", str(tmp_path / "m.keras")], "line 5"),
        "missing model file": (["export", "--model", str(tmp_path / "no.keras"),
                                "--out", str(out)], "does not exist"),
        "no recurrent layer": (["export", "--model", str(dense), "--out", str(out)],
                               "no recurrent layer"),
        "unsupported layer": (["export", "--model", str(bidi), "--out", str(out)],
                              "Bidirectional"),
        "feature count": (["quantize", "--model", str(gru_model), "--data",
                           "pickupgesture", "--out", str(out)], "channels"),
        "empty dataset": (["quantize", "--model", str(gru_model), "--data",
                           str(empty_csv), "--out", str(out)], "no frames"),
        "unwritable output": (["export", "--model", str(gru_model), "--out",
                               "/proc/version/model"], "/proc/version"),
    }


CASE_NAMES = ["missing data file", "malformed ts", "missing model file",
              "no recurrent layer", "unsupported layer", "feature count",
              "empty dataset", "unwritable output", "non-finite data",
              "verify missing folder", "train unwritable output"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_main_bad_input_gives_one_line_and_writes_nothing(case, tmp_path, gru_model,
                                                          capsys):
    argv, words = _cases(tmp_path, gru_model)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()
             if line and not line.startswith(("INFO", "WARNING"))]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("edgernn: error: ")
    assert words in lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
