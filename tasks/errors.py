"""Errors of the task contracts (standard library only; the service re-exports them).

TaskError
 ├── UnknownTask     a checkpoint or artifact names a task this tuneserve does not have
 └── InputError      a request item cannot be answered: HTTP 400, 401, 413 (or 503 when the
                     model queue is full) with {"error", "detail"}
"""


class TaskError(Exception):
    """Base class."""


class UnknownTask(TaskError, ValueError):
    """The registry has no such task; the message lists the known ones."""


class InputError(TaskError):
    """A request input is unusable; `reason` is a bounded metric label value."""

    def __init__(self, reason: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status
        self.retry_after = 1  # seconds, for 503: the estimated time the queue needs to drain
        self.shed_reason = ""  # 503: queue_full, deadline or timeout (service/batching.py)

    def body(self) -> dict:
        return {"error": self.reason, "detail": self.detail}

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status == 503:
            return {"Retry-After": str(self.retry_after)}
        return {}
