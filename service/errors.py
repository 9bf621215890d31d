"""Errors of the service (standard library only).

ServiceError
 ├── ArtifactError   the artifact cannot be served: missing, corrupt, unknown schema (start-up)
 └── InputError      a request cannot be answered (tasks.errors.InputError, re-exported:
                     the task contracts raise it while they decode a request)
"""

from tasks.errors import InputError

__all__ = ["ServiceError", "ArtifactError", "InputError"]


class ServiceError(Exception):
    """Base class."""


class ArtifactError(ServiceError):
    """Start-up refuses the artifact; the message is one line naming the file."""
