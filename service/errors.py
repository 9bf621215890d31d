"""Errors of the service (standard library only).

ServiceError
 ├── ArtifactError   the artifact cannot be served: missing, corrupt, unknown schema (start-up)
 └── InputError      one input is unusable: HTTP 400 or 413 with {"error", "detail"}
"""


class ServiceError(Exception):
    """Base class."""


class ArtifactError(ServiceError):
    """Start-up refuses the artifact; the message is one line naming the file."""


class InputError(ServiceError):
    """A request input is unusable; `reason` is a bounded metric label value."""

    def __init__(self, reason: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status

    def body(self) -> dict:
        return {"error": self.reason, "detail": self.detail}
