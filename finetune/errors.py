"""Errors of the fine-tuning stage; the CLI prints their message on one line and exits 2.

FinetuneError
 ├── DataError            the data path, format, columns or contents cannot be used
 ├── UnsupportedBackbone  unknown backbone name, or its weights cannot be loaded
 ├── CheckpointError      a checkpoint file is missing or corrupt
 └── OutputExists         --out already holds something and neither --overwrite nor --resume
"""


class FinetuneError(Exception):
    """Base class: a user-facing problem with a one-line message."""


class DataError(FinetuneError):
    """The data cannot be used as given."""


class UnsupportedBackbone(FinetuneError):
    """The backbone is unknown or its weights cannot be loaded."""


class CheckpointError(FinetuneError):
    """A checkpoint file is missing or corrupt; `path` names it."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class OutputExists(FinetuneError):
    """The output folder exists and the user did not ask to overwrite or resume."""
