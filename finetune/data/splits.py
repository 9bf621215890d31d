"""Three splits: train, validation (model selection, early stopping) and test (the holdout
that selection never sees: export gates, parity, int8 acceptance, drift calibration and the
`test_*` figures).

A split the data gives (a `val/` or `test/` folder, a `valid.txt` file) is used as given; a
missing one is carved from training, `test_fraction` and `val_fraction` of its examples,
stratified by label (classification), by group (question answering: one context never
straddles two splits) or at random (sentences). Items of a given split that also appear in an
earlier one are dropped and counted, so no test item was seen in training or selection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from finetune.errors import DataError

ROLES = ("train", "val", "test")


def carve(n_items: int, count: int, seed: int, strata=None, groups=None) -> tuple[list, list]:
    """Indices (kept, carved) with `count` items carved: stratified, grouped or random."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    idx = np.arange(n_items)
    if groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=count / n_items, random_state=seed)
        kept, carved = next(splitter.split(idx, groups=groups))
        return sorted(kept.tolist()), sorted(carved.tolist())
    kept, carved = train_test_split(idx, test_size=count, random_state=seed, stratify=strata)
    return sorted(kept.tolist()), sorted(carved.tolist())


def three_way(
    parts: dict[str, list],
    cfg,
    where: str,
    *,
    key: Callable | None = None,
    label: Callable | None = None,
    group: Callable | None = None,
    counts: Counter | None = None,
) -> dict[str, list]:
    """Complete `parts` (holding "train" and maybe "val", "test") into the three splits.

    `key(item)` identifies content (leaks between splits are dropped), `label(item)` stratifies,
    `group(item)` keeps groups whole. Counts `leaked_from_train` (validation items seen in
    training), `test_in_train` and `test_in_val`.
    """
    counts = counts if counts is not None else Counter()
    out = {role: list(parts[role]) for role in ROLES if role in parts}
    if key is not None:
        seen = {key(x) for x in out["train"]}
        for role, counter in (("val", "leaked_from_train"), ("test", "test_in_train")):
            if role in out:
                before = len(out[role])
                out[role] = [x for x in out[role] if key(x) not in seen]
                counts[counter] += before - len(out[role])
        if "val" in out and "test" in out:
            in_val = {key(x) for x in out["val"]}
            before = len(out["test"])
            out["test"] = [x for x in out["test"] if key(x) not in in_val]
            counts["test_in_val"] += before - len(out["test"])
    total = len(out["train"])  # fractions are of the training pool the data gave
    for role, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if role in out:
            continue
        train = out["train"]
        strata = [label(x) for x in train] if label is not None else None
        n_classes = len(set(strata)) if strata is not None else 1
        count = max(n_classes, int(round(total * fraction)))
        if len(train) - count < n_classes or count < 1:
            raise DataError(
                f"'{where}': {len(train)} examples are too few to carve a {role} split "
                f"({role}_fraction={fraction}) and keep {n_classes} class(es) in training"
            )
        groups = [group(x) for x in train] if group is not None else None
        if groups is not None and len(set(groups)) < 2:
            raise DataError(f"'{where}' has one group; a split by group needs two")
        kept, carved = carve(len(train), count, cfg.seed, strata, groups)
        out[role] = [train[i] for i in carved]
        out["train"] = [train[i] for i in kept]
    return out
