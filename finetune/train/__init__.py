"""Training: `fine_tune()` (run.py) sets a run up through its task's recipe and trains it in
the shared epoch loop (loop.py) with its optimizer and schedule (optim.py), under `torchrun`
when asked (dist.py); `--strategy auto` measures probe against fine-tune (auto.py); tables
fit trees or the MLP (tables.py).

    from finetune.train import fine_tune
"""

from finetune.train.run import Hooks, fine_tune

__all__ = ["Hooks", "fine_tune"]
