"""Classification metrics for one evaluation pass: the task contract's (tasks/), one source."""

from tasks.metrics import classification_metrics

__all__ = ["classification_metrics"]
