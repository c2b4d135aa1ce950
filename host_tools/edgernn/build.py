"""From a Keras model to a model folder the device can run.

A model folder holds ``step_float32.tflite``, ``step_int8.tflite``, optionally
``step_int8_edgetpu.tflite``, and ``manifest.json`` (see :mod:`edgernnd.manifest`).
Folders are written whole or not at all: everything goes to a temporary sibling
folder that is renamed into place at the end, so a failure leaves the previous
folder as it was and no half-written files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgernn import convert
from edgernn.step_model import FRAME_INPUT, SCORES_OUTPUT, StepSpec, describe_model
from edgernnd.errors import DataError, EdgernnError, ModelError
from edgernnd.manifest import (
    Manifest,
    ModelFile,
    Quantization,
    StatePair,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)

FLOAT_FILE = "step_float32.tflite"
INT8_FILE = "step_int8.tflite"
KERAS_FILE = "model.keras"


@dataclasses.dataclass
class StepExport:
    """A Keras model read out for streaming.

    Attributes:
        spec: The step model, without its leading normalization.
        mean, std: float32 (features,): the normalization the device applies to a
            raw frame before the model: (raw - mean) / std.
    """

    spec: StepSpec
    mean: np.ndarray
    std: np.ndarray

    def normalize(self, sequence: np.ndarray) -> np.ndarray:
        return ((np.asarray(sequence, np.float32) - self.mean) / self.std).astype(
            np.float32)


def load_keras_model(path: str | os.PathLike) -> Any:
    """Loads a ``.keras`` (or ``.h5``) model, with one clear error when it cannot."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} does not exist; give a .keras file "
                         "written by model.save() or by 'edgernn train'")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds; all mean the same
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load Keras model {str(path)!r}: {first}") from e


def export_model(model: Any) -> StepExport:
    """Reads a Keras model into a step model and its input normalization.

    A leading Normalization or Rescaling layer is taken out of the model and given
    to the device as per-channel mean and std, so that the int8 frame input is
    quantized after normalization (channels of very different ranges, such as an
    accelerometer in g beside a gyroscope in deg/s, then keep their precision).
    """
    spec = describe_model(model)
    mean = np.zeros(spec.features, np.float32)
    std = np.ones(spec.features, np.float32)
    first = spec.stages[0]
    if first.kind == "affine" and np.all(first.params["scale"] > 0):
        scale, offset = first.params["scale"], first.params["offset"]
        std = (1.0 / scale).astype(np.float32)
        mean = (-offset / scale).astype(np.float32)
        spec = dataclasses.replace(spec, stages=spec.stages[1:])
    return StepExport(spec, mean, std)


def check_features(export: StepExport, channels: int, where: str) -> None:
    """Raises when a dataset's channel count does not match the model."""
    if channels != export.spec.features:
        raise DataError(
            f"{where} has {channels} channels per frame but the model takes "
            f"{export.spec.features}; use recordings made for this model"
        )


@dataclasses.dataclass
class QuantizedModels:
    """The converted models and what the manifest says about them."""

    float_model: bytes
    int8_model: bytes
    float_tensors: dict[str, str]
    int8_tensors: dict[str, str]
    quantization: dict[str, Quantization]  # by signature name, int8 model


def quantize_export(export: StepExport, train_sequences: list[np.ndarray],
                    max_samples: int = 3000) -> QuantizedModels:
    """Converts to float32 and int8 and makes every state pair share quantization.

    Args:
        export: From :func:`export_model`.
        train_sequences: Raw training sequences, float32 (frames, features), for
            calibration (frames and the states the float model reaches on them).
        max_samples: Calibration steps kept.
    """
    if not train_sequences:
        raise DataError("no sequences to calibrate the int8 model on; give --data")
    spec = export.spec
    float_model = convert.convert_float(spec)
    normalized = [np.nan_to_num(export.normalize(s)) for s in train_sequences]
    samples = convert.record_calibration_samples(spec, normalized, max_samples)
    int8_model = convert.convert_int8(spec, samples)
    tensors = convert.bind_tensors(int8_model)
    pairs = [(tensors[s.name], tensors[s.output_name]) for s in spec.states]
    int8_model = convert.share_state_quantization(int8_model, pairs)
    names = [FRAME_INPUT, SCORES_OUTPUT] + [s.name for s in spec.states] + [
        s.output_name for s in spec.states]
    quantization = {n: convert.tensor_quantization(int8_model, tensors[n])
                    for n in names}
    return QuantizedModels(float_model, int8_model, convert.bind_tensors(float_model),
                           tensors, quantization)


def make_manifest(export: StepExport, models: QuantizedModels, labels: tuple[str, ...],
                  directory: Path, name: str, sequence_length: int,
                  channel_names: tuple[str, ...] | None = None,
                  extra_models: dict[str, ModelFile] | None = None) -> Manifest:
    """The manifest for a model folder whose model files are already written."""
    spec = export.spec
    if len(labels) != spec.classes:
        raise DataError(f"the model has {spec.classes} outputs but {len(labels)} class "
                        "labels were given; give one label per output")
    q = models.quantization
    files = {
        "float32": ModelFile(FLOAT_FILE, sha256_file(directory / FLOAT_FILE),
                             models.float_tensors),
        "int8": ModelFile(INT8_FILE, sha256_file(directory / INT8_FILE),
                          models.int8_tensors),
        **(extra_models or {}),
    }
    states = tuple(
        StatePair(s.name, s.layer, _cell_of(spec, s.name), s.size, q[s.name],
                  q[s.output_name])
        for s in spec.states
    )
    for s in states:
        if not s.shared:
            logger.warning("state %s: input and output quantization differ; the device "
                           "will requantize it on every step", s.name)
    return Manifest(
        name=name, models=files, features=spec.features,
        channel_names=channel_names or tuple(f"ch{i}" for i in range(spec.features)),
        mean=tuple(float(v) for v in export.mean),
        std=tuple(float(v) for v in export.std),
        frame_quantization=q[FRAME_INPUT], states=states, labels=tuple(labels),
        output_activation=spec.output_activation,
        scores_quantization=q[SCORES_OUTPUT], sequence_length=sequence_length,
        cells=tuple(spec.cells), tools=convert.tool_versions(), directory=directory,
    )


def _cell_of(spec: StepSpec, state_name: str) -> str:
    for stage in spec.stages:
        if any(s.name == state_name for s in stage.states):
            return stage.kind
    raise KeyError(state_name)


def write_model_folder(out_dir: str | os.PathLike,
                       fill: Callable[[Path], None]) -> Path:
    """Writes a folder whole or not at all.

    Args:
        out_dir: The folder to (re)place.
        fill: Called with a temporary sibling folder to write everything into.

    Raises:
        EdgernnError: The parent folder cannot be written.
    """
    out = Path(out_dir).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise EdgernnError(f"cannot write output folder {str(out)!r}: {e.strerror}; "
                           "choose a writable --out") from e
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_models(directory: Path, export: StepExport, models: QuantizedModels,
                 labels: tuple[str, ...], name: str, sequence_length: int,
                 channel_names: tuple[str, ...] | None = None) -> Manifest:
    """Writes both model files and the manifest into ``directory``."""
    (directory / FLOAT_FILE).write_bytes(models.float_model)
    (directory / INT8_FILE).write_bytes(models.int8_model)
    manifest = make_manifest(export, models, labels, directory, name, sequence_length,
                             channel_names)
    write_manifest(manifest, directory)
    return manifest


@dataclasses.dataclass
class BuildResult:
    """What ``edgernn build`` made.

    Attributes:
        out_dir: The model folder.
        manifest: Its manifest.
        report: The verify report.
        compiled: Whether an Edge TPU model was compiled.
        seconds: Wall time by stage.
    """

    out_dir: Path
    manifest: Manifest
    report: dict
    compiled: bool
    seconds: dict[str, float]


def fingerprint(parts: dict) -> str:
    """A digest of what a build depends on, to reuse a build whose inputs match."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
