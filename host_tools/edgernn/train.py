"""Train the default streaming classifier on a dataset of labelled sequences.

The model is a stack of recurrent layers that returns a prediction at every frame
(``return_sequences=True``) and is trained against the sequence's label at every
frame, so that a streaming device gets a usable prediction early in a recording,
not only at the frame count seen in training. The per-channel normalization is
learnt from the training split and kept in the model as a leading Normalization
layer; export moves it out into the manifest, where the device applies it in float
before quantizing the frame.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import numpy as np

from edgernnd.errors import DataError

logger = logging.getLogger(__name__)

CELLS = ("simplernn", "gru", "lstm")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Attributes:
    cell: simplernn, gru or lstm.
    units: Units per recurrent layer.
    layers: Number of stacked recurrent layers.
    epochs: Passes over the training split.
    batch_size: Sequences per gradient step.
    learning_rate: Adam's step size.
    seed: Makes training repeatable (same data, same seed, same weights).
    """

    cell: str = "simplernn"
    units: int = 64
    layers: int = 1
    epochs: int = 60
    batch_size: int = 8
    learning_rate: float = 0.005
    seed: int = 0


def normalization_stats(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every frame, float32 (channels,).

    A constant channel gets std 1 so that it does not divide by zero.
    """
    frames = np.concatenate([np.asarray(s, np.float64) for s in sequences])
    frames = frames[np.all(np.isfinite(frames), axis=1)]
    if len(frames) == 0:
        raise DataError("no finite frames to learn the normalization from")
    mean = frames.mean(axis=0)
    std = frames.std(axis=0)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def build_model(features: int, classes: int, settings: TrainSettings,
                mean: np.ndarray, std: np.ndarray) -> Any:
    """The default streaming classifier (Keras, untrained).

    Input float32 (batch, time, features) raw values; output float32
    (batch, time, classes) class probabilities at every frame.
    """
    import keras

    if settings.cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {settings.cell!r}")
    layer_class = {"simplernn": keras.layers.SimpleRNN, "gru": keras.layers.GRU,
                   "lstm": keras.layers.LSTM}[settings.cell]
    layers = [keras.Input((None, features), name="frames"),
              keras.layers.Normalization(mean=mean, variance=np.square(std),
                                         name="normalize")]
    for i in range(settings.layers):
        layers.append(layer_class(settings.units, return_sequences=True,
                                  name=f"{settings.cell}_{i}"))
    layers.append(keras.layers.Dense(classes, activation="softmax", name="classes"))
    return keras.Sequential(layers, name=f"edgernn_{settings.cell}")


def train_classifier(sequences: list[np.ndarray], labels: np.ndarray, classes: int,
                     settings: TrainSettings, progress: bool = True) -> Any:
    """Trains the default classifier.

    Args:
        sequences: Raw sequences, float32 (frames, features) each; they may differ
            in length (shorter ones are padded and the padding is not learnt from).
        labels: int class index per sequence.
        classes: Number of classes.
        settings: Architecture and training settings.
        progress: Print one line per epoch to stderr.

    Returns:
        The trained Keras model.
    """
    import keras
    import tensorflow as tf

    if not sequences:
        raise DataError("the training split is empty; give a dataset with sequences")
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()

    mean, std = normalization_stats(sequences)
    model = build_model(sequences[0].shape[1], classes, settings, mean, std)
    x, y, weights = _pad(sequences, labels, mean)
    model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate),
                  loss="sparse_categorical_crossentropy",
                  weighted_metrics=["accuracy"])
    callbacks = [_ProgressLine(settings.epochs)] if progress else []
    model.fit(x, y, sample_weight=weights, batch_size=settings.batch_size,
              epochs=settings.epochs, shuffle=True, verbose=0, callbacks=callbacks)
    return model


def _pad(sequences, labels, mean):
    """Pads to the longest sequence with the mean frame; padding gets weight 0."""
    frames = max(len(s) for s in sequences)
    features = sequences[0].shape[1]
    x = np.tile(mean, (len(sequences), frames, 1)).astype(np.float32)
    y = np.zeros((len(sequences), frames), np.int32)
    w = np.zeros((len(sequences), frames), np.float32)
    for i, (s, label) in enumerate(zip(sequences, labels)):
        s = np.nan_to_num(np.asarray(s, np.float32), nan=0.0)
        x[i, :len(s), :features] = s
        y[i, :] = label
        w[i, :len(s)] = 1.0
    return x, y, w


class _ProgressLine:
    """A Keras callback that prints one short line per epoch to stderr."""

    def __new__(cls, epochs: int):
        import keras

        class Progress(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                sys.stderr.write(
                    f"  epoch {epoch + 1:3d}/{epochs}  loss {logs.get('loss', 0):.4f}  "
                    f"frame accuracy {logs.get('accuracy', 0):.3f}\n")
                sys.stderr.flush()

        return Progress()
