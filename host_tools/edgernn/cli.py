"""The ``edgernn`` command: train, export, quantize, verify, compile, build, replay, demo.

Every subcommand ends with exit 0 on success; a problem the user can fix prints one
line (``edgernn: error: ...``) and exits non-zero, with the traceback only under
``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from edgernnd import __version__
from edgernnd.errors import EdgernnError

logger = logging.getLogger("edgernn")

# Exit code of 'edgernn compile' when the Edge TPU compiler is not installed: the
# static check still ran, but nothing was compiled.
EXIT_NO_COMPILER = 20

# The operators the step model's recurrent cells are written with
# (step_model.run_stages): every one must run on the Edge TPU once compiled.
RECURRENT_CELL_OPS = frozenset({"FULLY_CONNECTED", "ADD", "SUB", "MUL", "TANH",
                                "LOGISTIC"})


def _number(kind, low, high=None, what="a number"):
    """An argparse type: ``kind`` within [low, high], with a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {bound}")
        return value
    return parse


POSITIVE = _number(int, 1, what="a whole number")
NON_NEGATIVE = _number(int, 0, what="a whole number")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="edgernn", formatter_class=fmt,
        description="Build stateful recurrent step models for edge devices and try "
                    "them end to end.")
    parser.add_argument("--version", action="version", version=f"edgernn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(p, required=True):
        p.add_argument("--data", required=required, default=None,
                       help="training data: 'basicmotions', 'pickupgesture', or a "
                            ".ts/.csv file")
        p.add_argument("--test-data", default=None,
                       help="test data .ts/.csv (built-in names bring their own)")

    def train_args(p):
        from edgernn.train import CELLS, TrainSettings

        d = TrainSettings()
        p.add_argument("--cell", choices=CELLS, default=d.cell,
                       help="recurrent cell")
        p.add_argument("--units", type=POSITIVE, default=64,
                       help="units per recurrent layer")
        p.add_argument("--layers", type=POSITIVE, default=d.layers,
                       help="stacked recurrent layers")
        p.add_argument("--epochs", type=POSITIVE, default=d.epochs,
                       help="passes over the training data")
        p.add_argument("--seed", type=NON_NEGATIVE, default=d.seed,
                       help="makes training repeatable")

    p = sub.add_parser("train", formatter_class=fmt,
                       help="train the default streaming classifier")
    data_args(p)
    train_args(p)
    p.add_argument("--out", required=True, type=Path, help="the .keras file to write")

    p = sub.add_parser("export", formatter_class=fmt,
                       help="write the float32 step model of a Keras model")
    p.add_argument("--model", required=True, type=Path, help="a .keras sequence model")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")

    p = sub.add_parser("quantize", formatter_class=fmt,
                       help="write float32 and int8 step models and the manifest")
    p.add_argument("--model", required=True, type=Path, help="a .keras sequence model")
    data_args(p)
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels (default: from the data)")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")

    p = sub.add_parser("verify", formatter_class=fmt,
                       help="parity report of a model folder (JSON and PNG plots)")
    p.add_argument("--dir", required=True, type=Path, help="model folder")
    p.add_argument("--model", type=Path, default=None,
                   help="the source .keras model, for the Keras parity check")
    data_args(p)
    p.add_argument("--drift-steps", type=POSITIVE, default=100_000,
                   help="length of the continuous stream for the drift check")

    p = sub.add_parser("compile", formatter_class=fmt,
                       help="compile the int8 model for the Edge TPU "
                            f"(exit {EXIT_NO_COMPILER} when the compiler is missing)")
    p.add_argument("--dir", required=True, type=Path, help="model folder")

    p = sub.add_parser("build", formatter_class=fmt,
                       help="train (or take --model), export, quantize, verify, compile")
    data_args(p)
    train_args(p)
    p.add_argument("--model", type=Path, default=None,
                   help="use this .keras model instead of training one")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--drift-steps", type=POSITIVE, default=100_000,
                   help="length of the continuous stream for the drift check")
    p.add_argument("--reuse", action="store_true",
                   help="keep the folder if it was built from the same inputs")

    p = sub.add_parser("replay", formatter_class=fmt,
                       help="stream recordings to a serial port or URL")
    p.add_argument("--data", required=True,
                   help="recordings: a .ts/.csv file or a built-in name")
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="for built-in names")
    p.add_argument("--port", required=True,
                   help="pyserial URL: /dev/ttyUSB0, socket://127.0.0.1:7000, ...")
    p.add_argument("--baudrate", type=POSITIVE, default=115200, help="line speed")
    p.add_argument("--format", choices=("binary", "csv"), default="binary")
    p.add_argument("--payload", choices=("float32", "int16"), default="float32",
                   help="binary payload type")
    p.add_argument("--rate-hz", type=_number(float, 1e-3), default=10.0,
                   help="frames per second per stream (the recording's own rate)")
    p.add_argument("--speed", type=_number(float, 0.0), default=1.0,
                   help="multiple of --rate-hz; 0 = as fast as the port takes")
    p.add_argument("--streams", type=_number(int, 1, 65536, "a whole number"), default=1,
                   help="recordings played at once, interleaved, as stream ids 0..N-1")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0,
                   help="recordings to play (0 = all)")
    p.add_argument("--csv-reset-line", default="#reset",
                   help="line sent between recordings in csv")

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="the whole pipeline on BasicMotions over a virtual serial "
                            "link, no hardware needed")
    p.add_argument("--out", type=Path, default=Path("out/basicmotions"),
                   help="model folder (built, or reused when its inputs match)")
    p.add_argument("--mqtt", default=None, metavar="HOST:PORT",
                   help="send predictions through this MQTT broker instead of stdout")
    p.add_argument("--streams", type=_number(int, 1, 64, "a whole number"), default=4,
                   help="recordings played at once")
    p.add_argument("--speed", type=_number(float, 0.0), default=100.0,
                   help="multiple of the recording's 10 Hz; 0 = as fast as possible")
    p.add_argument("--format", choices=("binary", "csv"), default="binary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    handler = globals()[f"_cmd_{args.command}"]
    try:
        return handler(args) or 0
    except ImportError as e:
        if args.debug or (e.name or "").split(".")[0] not in ("tensorflow", "keras"):
            raise
        print(f"edgernn: error: '{args.command}' needs TensorFlow ({e.name} is not "
              "installed); install the host tools: pip install 'edgernn[host]'",
              file=sys.stderr)
        return 1
    except EdgernnError as e:
        if args.debug:
            raise
        print(f"edgernn: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgernn: interrupted", file=sys.stderr)
        return 130


def _load_data(args, need_test: bool = False):
    """(train, test) datasets from --data / --test-data."""
    from edgernn import datasets

    name = str(args.data)
    test_data = getattr(args, "test_data", None)
    if name.lower() in ("basicmotions", "pickupgesture"):
        if test_data:
            raise EdgernnError(f"--test-data is not used with the built-in {name!r}, "
                               "which brings its own test split; drop --test-data")
        train, test = datasets.load_builtin(name.lower())
    else:
        train = datasets.read_dataset(name)
        test = datasets.read_dataset(test_data) if test_data else None
    if need_test and test is None:
        print(f"note: no --test-data; verifying on the training data {name}",
              file=sys.stderr)
        test = train
    for data in (train, test):
        if data is not None:
            _check_finite(data)
    return train, test


def _check_finite(data) -> None:
    """Training and verification need every value: NaN or inf stops with a line."""
    import numpy as np

    for i, sequence in enumerate(data.sequences):
        bad = np.flatnonzero(~np.isfinite(sequence).all(axis=1))
        if len(bad):
            raise EdgernnError(
                f"{data.name}: recording {i} has a missing or infinite value at frame "
                f"{int(bad[0])}; fill or drop such frames before training")


def _settings(args):
    from edgernn.train import TrainSettings

    return TrainSettings(cell=args.cell, units=args.units, layers=args.layers,
                         epochs=args.epochs, seed=args.seed)


def _cmd_train(args) -> int:
    from edgernn.train import train_classifier

    train, _ = _load_data(args)
    out = args.out.resolve()
    _check_writable(out.parent)
    print(f"training {args.cell} x{args.layers} ({args.units} units) on {train.name}: "
          f"{len(train)} sequences, {train.channels} channels", file=sys.stderr)
    model = train_classifier(train.sequences, train.label_indices(),
                             len(train.class_names), _settings(args))
    tmp = out.parent / f".{out.name}.tmp.keras"
    try:
        model.save(tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EdgernnError(f"cannot write {str(out)!r}: {e.strerror}; choose another "
                           "--out") from e
    print(f"wrote {out}")
    return 0


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise EdgernnError(f"cannot create {str(folder)!r}: a file of that name is in "
                           "the way; choose another --out") from None
    except OSError as e:
        raise EdgernnError(f"cannot create {str(folder)!r}: {e.strerror}; choose "
                           "another --out") from e
    if not os.access(folder, os.W_OK):
        raise EdgernnError(f"output folder {str(folder)!r} is not writable; "
                           "choose another --out")


def _cmd_export(args) -> int:
    from edgernn import build, convert

    export = build.export_model(build.load_keras_model(args.model))
    model = convert.convert_float(export.spec)

    def fill(tmp: Path) -> None:
        (tmp / build.FLOAT_FILE).write_bytes(model)
        info = {"states": [s.name for s in export.spec.states],
                "tensors": convert.bind_tensors(model),
                "mean": export.mean.tolist(), "std": export.std.tolist()}
        (tmp / "step_float32.json").write_text(json.dumps(info, indent=2) + "\n")

    out = build.write_model_folder(args.out, fill)
    print(f"wrote {out / build.FLOAT_FILE}: states "
          f"{', '.join(s.name for s in export.spec.states)}")
    return 0


def _quantize_into(tmp: Path, export, train, labels, name, channel_names=None):
    from edgernn import build

    models = build.quantize_export(export, train.sequences)
    lengths = {len(s) for s in train.sequences}
    return build.write_models(tmp, export, models, labels, name,
                              lengths.pop() if len(lengths) == 1 else 0, channel_names)


def _cmd_quantize(args) -> int:
    from edgernn import build

    train, _ = _load_data(args)
    export = build.export_model(build.load_keras_model(args.model))
    build.check_features(export, train.channels, str(args.data))
    labels = tuple(args.labels.split(",")) if args.labels else train.class_names
    out = build.write_model_folder(
        args.out, lambda tmp: _quantize_into(tmp, export, train, labels, train.name))
    print(f"wrote {out}: {build.FLOAT_FILE}, {build.INT8_FILE}, manifest.json")
    return 0


def _run_verify(directory: Path, test, keras_model, drift_steps: int,
                plot_dir: Path) -> dict:
    from edgernn import verify
    from edgernnd.manifest import load_manifest

    manifest = load_manifest(directory)
    report = verify.verify(manifest, test.sequences, test.label_indices(), keras_model,
                           drift_steps, plot_dir)
    report["edgetpu_static_check"] = _static_check(manifest.model_path("int8"))
    return report


def _static_check(path: Path) -> dict:
    from edgernn import edgetpu_check

    return edgetpu_check.check_model(path).to_dict()


def _cmd_verify(args) -> int:
    from edgernn import build, verify
    from edgernnd.manifest import load_manifest

    load_manifest(args.dir)  # a clear error for a missing or damaged folder
    train, test = _load_data(args, need_test=True)
    keras_model = build.load_keras_model(args.model) if args.model else None
    plot_dir = args.dir / "verify"
    plot_dir.mkdir(exist_ok=True)
    report = _run_verify(args.dir, test, keras_model, args.drift_steps, plot_dir)
    verify.write_report(report, plot_dir / "report.json")
    _print_report(report)
    print(f"report: {plot_dir / 'report.json'}; plots: {plot_dir}/*.png")
    return 0


def _print_report(report: dict) -> None:
    q = report["int8_vs_float"]
    lines = []
    if "keras_vs_float_max_abs" in report:
        lines.append(f"Keras vs float step model, max |diff|: "
                     f"{report['keras_vs_float_max_abs']:.2e}")
    lines.append(f"int8 vs float top-1 agreement: per step "
                 f"{q['top1_agreement_per_step']:.1%}, last step "
                 f"{q['top1_agreement_last_step']:.1%}")
    if "accuracy_last_step" in report:
        a = report["accuracy_last_step"]
        lines.append(f"accuracy at the last step: float {a['float32']:.1%}, "
                     f"int8 {a['int8']:.1%}")
    d = report["drift"]
    lines.append(f"drift over {d['steps']} steps: max {d['max_abs_state_error']:.4f}, "
                 f"mean {d['mean_abs_state_error']:.4f}, "
                 f"{'bounded' if d['bounded'] else 'NOT bounded'}")
    e = report.get("edgetpu_static_check")
    if e is not None:
        lines.append("Edge TPU static check: " + (
            "every operator maps" if e["ok"] else "; ".join(e["problems"])))
    print("\n".join(lines))


def _cmd_compile(args) -> int:
    return _compile_folder(args.dir)


def _compile_folder(directory: Path) -> int:
    from edgernn import compile as edgetpu_compile
    from edgernnd.errors import RuntimeUnavailableError
    from edgernnd.manifest import (
        ModelFile,
        load_manifest,
        sha256_file,
        write_manifest,
    )

    manifest = load_manifest(directory)
    static = _static_check(manifest.model_path("int8"))
    if not static["ok"]:
        raise EdgernnError("the int8 model would not map to the Edge TPU: "
                           + "; ".join(static["problems"]))
    try:
        result = edgetpu_compile.compile_model(manifest.model_path("int8"), directory)
    except RuntimeUnavailableError as e:
        print(f"edgernn: {e}", file=sys.stderr)
        print("static check: every operator of the int8 model maps to the Edge TPU",
              file=sys.stderr)
        return EXIT_NO_COMPILER
    edgetpu_compile.check_compiled(result.report, RECURRENT_CELL_OPS)
    compiled = Path(result.output_path)
    models = dict(manifest.models)
    models["edgetpu"] = ModelFile(
        compiled.name, sha256_file(compiled), manifest.models["int8"].tensors,
        {"compiler_version": result.report.compiler_version})
    import dataclasses

    write_manifest(dataclasses.replace(manifest, models=models), directory)
    print(f"compiled {compiled} ({result.report.compiler_version})")
    return 0


def _cmd_build(args) -> int:
    from edgernn import build, verify

    started = time.monotonic()
    train, test = _load_data(args, need_test=True)
    key = build.fingerprint({
        "data": str(args.data), "rows": [len(s) for s in train.sequences],
        "checksum": float(sum(float(abs(s).sum()) for s in train.sequences)),
        "settings": vars(_settings(args)) if args.model is None else str(args.model),
        "model_sha": _sha(args.model), "version": __version__,
        "drift": args.drift_steps})
    stamp = args.out / "build.json"
    if args.reuse and stamp.is_file():
        from edgernnd.manifest import load_manifest

        try:
            if json.loads(stamp.read_text()).get("fingerprint") == key:
                load_manifest(args.out)  # every file present and unchanged
                print(f"reusing {args.out}: built from the same inputs")
                return 0
        except (OSError, ValueError, EdgernnError) as e:
            print(f"not reusing {args.out} ({e}); building it again", file=sys.stderr)
    _check_writable(Path(args.out).resolve().parent)

    seconds = {}
    t = time.monotonic()
    if args.model is not None:
        keras_model = build.load_keras_model(args.model)
    else:
        from edgernn.train import train_classifier

        print(f"training {args.cell} ({args.units} units) on {train.name}: "
              f"{len(train)} sequences x {train.channels} channels", file=sys.stderr)
        keras_model = train_classifier(train.sequences, train.label_indices(),
                                       len(train.class_names), _settings(args))
    seconds["train"] = time.monotonic() - t
    export = build.export_model(keras_model)
    build.check_features(export, train.channels, str(args.data))
    state = {}

    def fill(tmp: Path) -> None:
        t = time.monotonic()
        print("exporting and quantizing the step model", file=sys.stderr)
        if args.model is None:
            keras_model.save(tmp / build.KERAS_FILE)
        _quantize_into(tmp, export, train, train.class_names, train.name)
        seconds["export_quantize"] = time.monotonic() - t
        t = time.monotonic()
        print(f"verifying ({args.drift_steps} drift steps)", file=sys.stderr)
        (tmp / "verify").mkdir()
        state["report"] = _run_verify(tmp, test, keras_model, args.drift_steps,
                                      tmp / "verify")
        verify.write_report(state["report"], tmp / "verify" / "report.json")
        seconds["verify"] = time.monotonic() - t
        state["compile"] = _compile_folder(tmp)
        seconds["total"] = time.monotonic() - started
        (tmp / "build.json").write_text(json.dumps(
            {"fingerprint": key, "seconds": seconds}, indent=2) + "\n")

    out = build.write_model_folder(args.out, fill)
    _print_report(state["report"])
    if state["compile"] == EXIT_NO_COMPILER:
        print("Edge TPU: compiler not installed here; int8 model only")
    print(f"built {out} in {seconds['total']:.1f} s "
          f"(train {seconds['train']:.1f} s)")
    return 0


def _sha(path) -> str | None:
    if path is None:
        return None
    from edgernnd.manifest import sha256_file

    return sha256_file(path) if Path(path).is_file() else None


def _cmd_replay(args) -> int:
    from edgernn import replay

    return replay.main_replay(args)


def _cmd_demo(args) -> int:
    from edgernn import demo

    return demo.run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
