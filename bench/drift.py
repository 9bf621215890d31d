"""Drift on real data: `python bench/drift.py --run RUN [--artifact ART]`.

A tabular run (German credit) is compared with Evidently's data-drift preset on the same
windows: bench/drift_tabular.py. A text run:

The sms_spam model's exported calibration (reference.json) with the service's runtime and
monitor: windows of held-out SMS texts (in distribution: the calibration's own holdout, so
an optimistic control), SMS truncated to their first three words, and AG News headlines
(../shared/data/agnews, another domain). Prints each check's score (>= 1 fires) and the
samples needed before the first alarm.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve import artifact_for  # noqa: E402

import tasks  # noqa: E402


def scores_for(rt, drift: dict, texts: list[str], step: int = 25) -> tuple[dict | None, int | None]:
    """Feed texts in batches to a fresh monitor of `drift` (reference.json's calibration); the
    final scores and the samples seen at the first alarm."""
    from service.drift import Monitor

    monitor = Monitor(drift)
    first = None
    for i in range(0, len(texts), step):
        stats: dict = {}
        logits, emb = rt.run([rt.prepare(t) for t in texts[i : i + step]], stats)
        monitor.observe(logits, emb, stats["tokens"])
        s = monitor.scores()
        if first is None and s and max(s.values()) >= 1:
            first = i + step
    return monitor.scores(), first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default="runs/sms_spam")
    p.add_argument("--artifact", default=None)
    p.add_argument("--agnews", default=str(ROOT.parent / "shared/data/agnews/test.tsv"))
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--trials", type=int, default=20, help="tables: trials per shift")
    p.add_argument("--step", type=int, default=40, help="tables: shifted rows added per check")
    args = p.parse_args()
    run, agnews = Path(args.run), Path(args.agnews)
    if (run / "config.json").is_file() and tasks.uses_tables(
        json.loads((run / "config.json").read_text())["task"]
    ):
        from drift_tabular import compare, report

        tmp = Path(tempfile.mkdtemp(prefix="bench-drift-"))
        artifact = artifact_for(run, args.artifact, tmp)
        print(report(compare(run, artifact, args.trials, args.step, 0), args.trials))
        return 0
    if not run.is_dir() or not agnews.is_file():
        print(f"needs {run} and {agnews}; skipped")
        return 0
    from finetune import checkpoint
    from service.runtime import Runtime

    artifact = artifact_for(run, args.artifact, Path(tempfile.mkdtemp(prefix="bench-drift-")))
    rt = Runtime(artifact)
    rng = np.random.default_rng(0)
    sms = [str(t) for t in checkpoint.load_checkpoint(run).holdout_inputs]
    sms = [sms[i] for i in rng.integers(0, len(sms), args.samples)]
    with open(agnews, newline="") as f:
        news = [row[0] for row in csv.reader(f, delimiter="\t") if row][1:]
    news = [news[i] for i in rng.permutation(len(news))[: args.samples]]
    cases = {
        "sms holdout (in distribution)": sms,
        "sms cut to 3 words": [" ".join(t.split()[:3]) or t for t in sms],
        "AG News headlines": news,
    }
    drift = json.loads((artifact / "reference.json").read_text())["drift"]
    print(
        f"artifact {artifact}: window {drift['window']}, target false-alarm rate "
        f"{drift['target_false_alarm_rate']} per evaluation"
    )
    print(f"{'traffic':<32} " + " ".join(f"{c:>11}" for c in drift["thresholds"]) + "  first alarm")
    for name, texts in cases.items():
        s, first = scores_for(rt, drift, texts)
        cells = " ".join(f"{s[c]:>11.2f}" for c in drift["thresholds"])
        print(f"{name:<32} {cells}  {first if first else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
