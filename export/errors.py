"""Errors of the export stage (standard library only: the service imports this module).

ExportError
 ├── CheckpointInvalid   the checkpoint cannot be read (names the file)
 ├── ParityError         ONNX outputs differ from PyTorch beyond tolerance
 ├── VariantError        a variant cannot be built or validated here (e.g. fp16 without CUDA)
 ├── VersionExists       artifacts/<name>/<version> or the store tag already exists
 └── CardError           card.json missing, malformed, of an unknown schema, or files
                         that do not match their sha256
"""


class ExportError(Exception):
    """Base class: a user-facing problem with a one-line message."""


class CheckpointInvalid(ExportError):
    """The checkpoint cannot be read; `path` names the file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class ParityError(ExportError):
    """ONNX Runtime disagrees with PyTorch; `failures` holds one line per failed check."""

    def __init__(self, failures: list[str], max_abs_diff: float, top1_agreement: float):
        super().__init__(
            f"parity check failed ({len(failures)} problem(s)): " + "; ".join(failures)
        )
        self.failures = failures
        self.max_abs_diff = max_abs_diff
        self.top1_agreement = top1_agreement


class VariantError(ExportError):
    """A precision variant cannot be built or validated on this machine."""


class VersionExists(ExportError):
    """The artifact version exists already; versions are never overwritten."""


class CardError(ExportError):
    """The artifact's card is missing, malformed, of an unknown schema, or does not match."""
