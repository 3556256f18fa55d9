"""One error hierarchy for edgeopt.

Library code raises these; ``cli.py`` catches :class:`EdgeoptError` once, prints its message on one line
and exits with :attr:`EdgeoptError.exit_code`. Messages name the file involved and the fix.
"""

from __future__ import annotations


class EdgeoptError(Exception):
    """Base class of every error edgeopt reports to a user."""

    exit_code = 2


class ConfigError(EdgeoptError, ValueError):
    """A stage's configuration is invalid (bad value, conflicting options)."""


class DataError(EdgeoptError):
    """The data set is missing, empty, or does not fit the model."""


class CheckpointError(EdgeoptError):
    """A checkpoint is missing, truncated, untrusted, or does not match what was asked."""


class OutputError(EdgeoptError):
    """An output path cannot be written."""


class DivergedError(EdgeoptError):
    """Training's loss or weights stopped being finite (too high a learning rate, most often)."""

    exit_code = 1


class NonFiniteOutputError(EdgeoptError):
    """The model answered NaN or inf: its weights are broken (a diverged training run); no probability is given."""

    exit_code = 1


class OnnxModelError(EdgeoptError):
    """An ONNX file is missing or damaged, or its recorded facts are."""


class ModelInputError(OnnxModelError):
    """An ONNX model's input is not what edgeopt's batcher can feed."""


class DeviceError(ConfigError):
    """The device asked for cannot run here: no CUDA device for PyTorch, or no CUDA build of ONNX Runtime."""


class CalibrationError(EdgeoptError):
    """Calibration cannot run or its cache does not fit the model."""


class EngineError(EdgeoptError):
    """An engine cannot be built or run here."""


class RunnerError(EdgeoptError):
    """The artifact cannot be run with the backend or device asked for."""


class PackageError(EdgeoptError):
    """The model cannot be packaged as asked."""


class SearchError(EdgeoptError):
    """The search cannot go on (a study that does not match, trials that keep failing)."""


class ServeError(EdgeoptError):
    """The service cannot start (missing dependency, port in use)."""


class RequestError(EdgeoptError):
    """A request the service refuses, answered with ``status`` and the message as ``{"detail": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
