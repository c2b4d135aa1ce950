"""The one exception hierarchy of edgernn: every error a user can cause is an
:class:`EdgernnError`, whose message is one line naming the problem and the fix."""


class EdgernnError(Exception):
    """Base class. Command-line tools print ``str(error)`` and exit non-zero."""

    exit_code = 1


class ConfigError(EdgernnError):
    """The daemon's configuration is invalid."""

    exit_code = 2


class ManifestError(EdgernnError):
    """A manifest or model file is missing, corrupt, or does not match."""

    exit_code = 3


class RuntimeUnavailableError(EdgernnError):
    """No usable TFLite runtime, or the Edge TPU cannot be used."""

    exit_code = 4


class DataError(EdgernnError):
    """An input recording or dataset is malformed."""

    exit_code = 5


class ModelError(EdgernnError):
    """A Keras model cannot be turned into a streaming step model."""

    exit_code = 6
