"""Errors a user can fix: the CLI prints their message as one line, `rlhf-fast <stage>: <what>,
<where>`, and exits 2 (the traceback only with --debug)."""


class UserError(Exception):
    """A bad config value, data line, file or model directory; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config that cannot run: unknown keys, a wrong type or range, inconsistent batch sizes."""


class DataError(UserError, ValueError):
    """A record or file that cannot be used; the message starts with "path:line: " where it can."""


class ModelDirError(UserError, ValueError):
    """A model directory that is missing, incomplete, of the wrong kind, or holds non-finite weights."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or run directory that cannot be resumed or reused as asked."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""
