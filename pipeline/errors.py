"""Errors a user can fix. Stages print them as one line and exit non-zero, without a traceback."""


class PipelineError(Exception):
    """Bad input or configuration; the message names the file, column, row or key at fault."""


class ConfigError(PipelineError):
    """A config key is unknown, missing, mistyped or out of range."""


class DataValidationError(PipelineError):
    """A dataset source breaks the stage contract (missing column, empty text, unknown label...)."""


class CheckpointError(PipelineError):
    """A model folder (a pretrained snapshot or a trained model) is incomplete, unsafe to load,
    or cannot be loaded."""


class TrackingAuthError(PipelineError):
    """The tracking server refused the request: credentials missing or wrong (HTTP 401), or the
    account may not do it (HTTP 403)."""
