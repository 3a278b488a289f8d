"""The project's exceptions: one base class, one subclass per kind of failure.

Every error that a user can cause names where it came from: a corpus error names the
file and line, a configuration error names the field.

>>> str(CorpusError("unbalanced parentheses", path="train.txt", line=12))
'train.txt:12: unbalanced parentheses'
>>> str(ConfigError("lr", "must be > 0, got -1"))
'lr: must be > 0, got -1'
"""

from __future__ import annotations

from pathlib import Path


class RayMtupError(Exception):
    """Base class of every error raised on purpose by ray_mtup."""


class CorpusError(RayMtupError):
    """Malformed corpus input; carries the file and the 1-based line number."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}" if where else message)


class AmrError(RayMtupError):
    """A graph that cannot be decoded, linearised or restored."""


class ConfigError(RayMtupError, ValueError):
    """An invalid configuration value; carries the field's name."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelError(RayMtupError):
    """A model or tokenizer that cannot be built or loaded."""


class ScoringError(RayMtupError):
    """Inputs that cannot be scored together (e.g. different numbers of graphs)."""


class TrainingError(RayMtupError):
    """A training run that cannot go on (e.g. the loss became NaN or infinite)."""


class CheckpointError(RayMtupError):
    """A checkpoint that cannot be used (truncated, missing or unparseable file); names the file."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


#: Errors that fail the same way every time (a model that cannot be loaded, a bad config, a bad
#: corpus): a run that meets one ends with it, unretried (ray_mtup.training reports it as the
#: run's ``stop_reason``; Ray Train retries only crashed or killed workers).
PERMANENT_ERRORS: tuple[type[RayMtupError], ...] = (ModelError, ConfigError, CorpusError)


def permanent_error(kind: str, message: str) -> RayMtupError:
    """The permanent error named ``kind`` (a class name of :data:`PERMANENT_ERRORS`), rebuilt
    from a worker's report.

    >>> permanent_error("ModelError", "cannot load the tokenizer of X")
    ModelError('cannot load the tokenizer of X')
    """
    cls = next((c for c in PERMANENT_ERRORS if c.__name__ == kind), ModelError)
    if cls is ConfigError:  # its message is "field: message"
        field, _, rest = message.partition(": ")
        return ConfigError(field, rest) if rest else ConfigError("config", message)
    return cls(message)
