"""The manifest: the contract between the host tools and the device.

``manifest.json`` sits beside the ``.tflite`` files. The host tools write it; the
daemon needs nothing else. It names every tensor the device touches (by name, never
by position), their int8 quantization, the per-channel normalization of the frame,
the class labels, and the sha256 of each model file. The README documents every
field; :data:`FORMAT_VERSION` is bumped when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgernnd.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Affine int8 quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point}


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """Attributes:
    file: File name, relative to the manifest's folder.
    sha256: Hex digest of the file.
    tensors: Signature name (``frame``, ``scores``, ``<state>``,
        ``<state>_next``) to the tensor's name inside this file.
    extra: Other facts (the Edge TPU compiler's version, for instance).
    """

    file: str
    sha256: str
    tensors: dict[str, str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StatePair:
    """One recurrent state: fed in as ``name`` and read back as ``name + '_next'``.

    Attributes:
        name: Signature name of the state input, e.g. ``simple_rnn_h``.
        layer: The Keras layer it belongs to.
        cell: ``simplernn``, ``gru`` or ``lstm``.
        size: Units; the tensor shape is (1, size).
        input_quantization: Of the state input in the int8 model.
        output_quantization: Of the state output. When equal to the input's, the
            device copies int8 state straight back; otherwise it requantizes.
    """

    name: str
    layer: str
    cell: str
    size: int
    input_quantization: Quantization
    output_quantization: Quantization

    @property
    def output_name(self) -> str:
        return self.name + "_next"

    @property
    def shared(self) -> bool:
        return self.input_quantization == self.output_quantization


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything the device needs to run a step model.

    Attributes:
        name: Model name (the dataset it was trained on, by default).
        models: ``float32``, ``int8`` and optionally ``edgetpu`` model files.
        features: Channels per frame.
        channel_names: One name per channel (may be generic ``ch0``...).
        mean, std: Per-channel normalization: the model sees (raw - mean) / std.
        frame_quantization: Of the int8 frame input.
        states: Every recurrent state pair, in model order.
        labels: Class labels, in score order.
        output_activation: ``softmax`` or ``sigmoid``.
        scores_quantization: Of the int8 scores output.
        sequence_length: Frames per sequence seen in training (0 when varying).
        cells: Cell kinds in layer order.
        tools: Versions of what built it.
        directory: Folder the manifest was read from (not stored in the file).
    """

    name: str
    models: dict[str, ModelFile]
    features: int
    channel_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frame_quantization: Quantization
    states: tuple[StatePair, ...]
    labels: tuple[str, ...]
    output_activation: str
    scores_quantization: Quantization
    sequence_length: int
    cells: tuple[str, ...]
    tools: dict[str, str]
    directory: Path = Path(".")

    def model_path(self, variant: str) -> Path:
        """Path of the ``float32``, ``int8`` or ``edgetpu`` model file."""
        if variant not in self.models:
            raise ManifestError(
                f"the manifest in {str(self.directory)!r} has no {variant!r} model; it "
                f"has {sorted(self.models)}"
            )
        return self.directory / self.models[variant].file

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "models": {
                k: {"file": m.file, "sha256": m.sha256, "tensors": dict(m.tensors),
                    **m.extra}
                for k, m in self.models.items()
            },
            "frame": {
                "features": self.features,
                "channel_names": list(self.channel_names),
                "mean": list(self.mean),
                "std": list(self.std),
                "dtype": "int8",
                "quantization": self.frame_quantization.to_dict(),
            },
            "states": [
                {"name": s.name, "layer": s.layer, "cell": s.cell, "size": s.size,
                 "shape": [1, s.size], "dtype": "int8",
                 "input_quantization": s.input_quantization.to_dict(),
                 "output_quantization": s.output_quantization.to_dict(),
                 "shared_quantization": s.shared}
                for s in self.states
            ],
            "output": {
                "labels": list(self.labels),
                "activation": self.output_activation,
                "dtype": "int8",
                "quantization": self.scores_quantization.to_dict(),
            },
            "sequence_length": self.sequence_length,
            "cells": list(self.cells),
            "tools": dict(self.tools),
        }


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Writes ``manifest.json`` atomically (temporary file, then rename)."""
    path = Path(directory) / MANIFEST_NAME
    write_text_atomic(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Writes a file so that readers see the old or the new one, never half."""
    write_bytes_atomic(path, text.encode(), mode)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes bytes to a temporary file in the same folder, fsyncs, renames."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_manifest(directory: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Reads and validates ``manifest.json`` from a model folder.

    Args:
        directory: The folder (or the manifest file itself).
        check_files: Also check that each model file exists and its sha256 matches.

    Raises:
        ManifestError: Missing, unreadable, from a newer format, inconsistent, or a
            model file is missing or changed.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest at {str(path)!r}; point model.dir at a folder written by "
            "'edgernn build'"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {str(path)!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {str(path)!r} is not valid JSON: {e}") from e
    manifest = parse_manifest(raw, path.parent)
    if check_files:
        for variant in manifest.models:
            verify_model_file(manifest, variant)
    return manifest


def verify_model_file(manifest: Manifest, variant: str) -> Path:
    """Checks that a model file exists and has the sha256 the manifest says."""
    model_path = manifest.model_path(variant)
    try:
        digest = sha256_file(model_path)
    except FileNotFoundError:
        raise ManifestError(
            f"model file {str(model_path)!r} named by the manifest is missing; copy the "
            "whole model folder"
        ) from None
    if digest != manifest.models[variant].sha256:
        raise ManifestError(
            f"model file {str(model_path)!r} does not match the manifest (sha256 "
            f"{digest[:12]}..., manifest says {manifest.models[variant].sha256[:12]}...); "
            "copy the model folder again or rebuild it"
        )
    return model_path


def parse_manifest(raw: Any, directory: Path = Path(".")) -> Manifest:
    """Validates a manifest given as parsed JSON."""
    where = f"manifest in {str(directory)!r}"
    try:
        if not isinstance(raw, dict):
            raise TypeError("top level is not an object")
        version = raw["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestError(
                f"{where} has format_version {version!r}; this edgernnd reads up to "
                f"{FORMAT_VERSION}: upgrade edgernn on the device"
            )
        models = {
            k: ModelFile(
                file=str(v["file"]), sha256=str(v["sha256"]),
                tensors={str(a): str(b) for a, b in v["tensors"].items()},
                extra={x: y for x, y in v.items()
                       if x not in ("file", "sha256", "tensors")},
            )
            for k, v in raw["models"].items()
        }
        frame = raw["frame"]
        out = raw["output"]
        states = tuple(
            StatePair(
                name=str(s["name"]), layer=str(s["layer"]), cell=str(s["cell"]),
                size=int(s["size"]),
                input_quantization=_quantization(s["input_quantization"]),
                output_quantization=_quantization(s["output_quantization"]),
            )
            for s in raw["states"]
        )
        manifest = Manifest(
            name=str(raw.get("name", "model")),
            models=models,
            features=int(frame["features"]),
            channel_names=tuple(str(c) for c in frame["channel_names"]),
            mean=tuple(float(m) for m in frame["mean"]),
            std=tuple(float(s) for s in frame["std"]),
            frame_quantization=_quantization(frame["quantization"]),
            states=states,
            labels=tuple(str(label) for label in out["labels"]),
            output_activation=str(out.get("activation", "softmax")),
            scores_quantization=_quantization(out["quantization"]),
            sequence_length=int(raw.get("sequence_length", 0)),
            cells=tuple(str(c) for c in raw.get("cells", ())),
            tools={str(k): str(v) for k, v in raw.get("tools", {}).items()},
            directory=directory,
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(
            f"{where} is malformed ({type(e).__name__}: {e}); rebuild it with "
            "'edgernn build'"
        ) from e
    _check_consistency(manifest, where)
    return manifest


def _quantization(raw: dict) -> Quantization:
    scale = float(raw["scale"])
    zero_point = int(raw["zero_point"])
    if not scale > 0 or not -128 <= zero_point <= 127:
        raise ValueError(f"bad int8 quantization {raw!r}")
    return Quantization(scale, zero_point)


def _check_consistency(m: Manifest, where: str) -> None:
    problems = []
    if m.features < 1:
        problems.append(f"features is {m.features}")
    if not (len(m.mean) == len(m.std) == len(m.channel_names) == m.features):
        problems.append("mean, std and channel_names must each have one entry per feature")
    if any(s <= 0 for s in m.std):
        problems.append("std has a value <= 0")
    if not m.labels:
        problems.append("no class labels")
    if "int8" not in m.models:
        problems.append("no int8 model")
    for variant, model in m.models.items():
        needed = {"frame", "scores"} | {s.name for s in m.states} | {
            s.output_name for s in m.states}
        missing = needed - set(model.tensors)
        if missing:
            problems.append(f"{variant} model lacks tensor names for {sorted(missing)}")
    if problems:
        raise ManifestError(f"{where} is inconsistent: {problems[0]}; rebuild it")
