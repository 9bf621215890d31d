"""Tabular runs: gradient-boosted trees fitted by scikit-learn, or the MLP trained in the
shared loop (recipes/tabular.py says how each is fitted, encoded and written).

    python -m finetune ../shared/data/german_credit/german.data --label-column -1 [--backbone mlp]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from finetune import checkpoint
from finetune.data import describe, load_dataset
from finetune.recipes import MLPRecipe
from finetune.recipes import tabular as tables
from finetune.train.loop import Phase, Trainer
from finetune.train.output import claim_out


def _fit_mlp(t: tables.Table, run) -> tables.Fitted:
    """The MLP through the shared loop; its best epoch's weights are kept."""
    from safetensors.torch import load_model

    setup = tables.mlp_setup(t)
    recipe = MLPRecipe(setup, run.device, run.log)
    setup.model.to(run.device)
    trainer = Trainer(recipe, setup.cfg, run.out, run.dist, run.log, {})
    phase = Phase("train", "full", tables.MLP_EPOCHS, tables.MLP_PATIENCE)
    outcome = trainer.run(phase)
    load_model(setup.model, str(run.out / checkpoint.WEIGHTS))
    shutil.rmtree(run.out / checkpoint.RESUME, ignore_errors=True)
    setup.model.cpu()
    return tables.mlp_fitted(setup, outcome, trainer.history)


def fine_tune_table(data: Path, cfg, run) -> dict:
    """Fit, choose the threshold on validation, score validation and test, write the run."""
    ds = load_dataset(data, cfg)
    run.log(describe(ds.summary))
    t = tables.prepare(ds, cfg, run.log)
    kind = tables.kind(cfg, t.init)
    claim_out(run.out)
    fitted = _fit_mlp(t, run) if kind == tables.MLP else tables.fit_trees(t)
    post = tables.threshold(t, fitted)
    figures = tables.figures(t, fitted, post)
    result = {"epoch": fitted.epochs, "strategy": kind, **figures}
    tables.write(run.out, t, post, fitted, result, time.perf_counter() - run.t_start)
    run.log(
        f"{fitted.epochs} {'boosting rounds' if kind == tables.TREES else 'epochs (best)'}; "
        + "  ".join(f"{k} {v:.4f}" for k, v in figures.items() if k.startswith(("val", "test")))
    )
    run.log(f"checkpoint: {run.out}/  (report: {run.out}/report/)")
    return result
