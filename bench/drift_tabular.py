"""Drift on a real table against Evidently: `python bench/drift.py --run runs/german_credit`
(a tabular run; its artifact is exported when not given).

The same windows of 200 rows go to tuneserve's monitor (the artifact's calibration:
per-column checks plus prediction, confidence and embedding, one family-wise false-alarm
rate) and to Evidently's default data-drift preset (`DataDriftPreset`, in its own virtual
environment, bench/.venv-evidently, created here: Evidently is not a tuneserve dependency).
Evidently's reference is the same holdout rows tuneserve calibrated on.

Each trial starts from a window of rows the holdout did not hold, drawn without replacement
(no shift: a false alarm if a detector fires), then replaces its rows with shifted ones,
`--step` at a time, until the window is all shifted: the samples to detection are the
shifted rows in the window when a detector first fires. Shifts: the widest numeric column
scaled by 1.3, a third of the rows given the first categorical column's rarest category,
and the rarer class oversampled to 60% of the rows (prior shift: every column moves a
little).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVIDENTLY_VENV = ROOT / "bench" / ".venv-evidently"
EVIDENTLY = ("evidently==0.7.*", "pandas<3")  # evidently 0.7 imports a helper pandas 3 dropped
WINDOW = 200  # rows per window, the service's drift window (tasks/drift.py WINDOW)


def evidently_python() -> Path:
    python = EVIDENTLY_VENV / "bin" / "python"
    if not python.is_file():
        print(f"creating {EVIDENTLY_VENV} with {' '.join(EVIDENTLY)} ...", flush=True)
        venv.create(EVIDENTLY_VENV, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *EVIDENTLY], check=True)
    return python


RUNNER = r"""
import json, sys, warnings
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
warnings.filterwarnings("ignore")
job = json.load(open(sys.argv[1]))
ref = pd.DataFrame(job["reference"], columns=job["columns"])
for c in job["categorical"]:
    ref[c] = ref[c].astype("object")
out = []
for rows in job["windows"]:
    cur = pd.DataFrame(rows, columns=job["columns"])
    for c in job["categorical"]:
        cur[c] = cur[c].astype("object")
    d = Report([DataDriftPreset()]).run(current_data=cur, reference_data=ref).dict()
    m = {x["metric_name"]: x["value"] for x in d["metrics"]}
    share = next(v["share"] for k, v in m.items() if k.startswith("DriftedColumnsCount"))
    p = [v for k, v in m.items() if k.startswith("ValueDrift")]
    drifted = int(sum(v < 0.05 for v in p))
    out.append({"share": float(share), "drifted": drifted, "min_p": float(min(p))})
json.dump(out, open(sys.argv[2], "w"))
"""


def _raw(contract, row: np.ndarray) -> list:
    """An encoded row as raw values (categories as strings, missing as None)."""
    request = contract.holdout_request(row)
    return [request[c] for c in contract.columns]


def _shifts(contract, pool: np.ndarray, labels: np.ndarray, rng) -> dict:
    """name → function(n) returning n shifted encoded rows."""
    feats = contract.features
    numeric = [j for j, f in enumerate(feats) if f["kind"] != "categorical"]
    categorical = [j for j, f in enumerate(feats) if f["kind"] == "categorical"]
    shifts = {}
    if numeric:
        j = max(numeric, key=lambda k: len(np.unique(pool[:, k][~np.isnan(pool[:, k])])))

        def scaled(n, j=j):
            x = pool[rng.choice(len(pool), n, replace=False)]
            x[:, j] *= 1.3
            return x

        shifts[f"'{feats[j]['name']}' x 1.3"] = scaled
    if categorical:
        j = categorical[0]
        rare = len(feats[j]["categories"]) - 1

        def mixed(n, j=j, rare=rare):
            x = pool[rng.choice(len(pool), n, replace=False)]
            x[rng.random(n) < 1 / 3, j] = rare
            return x

        shifts[f"'{feats[j]['name']}': 1/3 -> '{feats[j]['categories'][rare]}'"] = mixed
    rarer = int(np.argmin(np.bincount(labels, minlength=2)))
    pos, neg = pool[labels == rarer], pool[labels != rarer]

    def prior(n):
        k = int(round(0.6 * n))
        return rng.permutation(
            np.concatenate(
                [
                    pos[rng.choice(len(pos), k, replace=False)],
                    neg[rng.choice(len(neg), n - k, replace=False)],
                ]
            )
        )

    shifts[f"class '{contract.labels[rarer]}' at 60%"] = prior
    return shifts


def compare(run: Path, artifact: Path, trials: int, step: int, seed: int) -> dict:
    from finetune import checkpoint
    from finetune.data.tabular import read_table
    from service.drift import Monitor
    from service.runtime import Runtime

    rt = Runtime(artifact)
    contract = rt.contract
    drift = json.loads((artifact / "reference.json").read_text())["drift"]
    ckpt = checkpoint.load_checkpoint(run)
    held = {tuple(np.nan_to_num(r, nan=-1e9)) for r in ckpt.holdout_inputs}
    summary = ckpt.config["data"]
    df = read_table(Path(summary["path"]))
    label_col = summary["label_column"]
    index = {c: i for i, c in enumerate(ckpt.labels)}
    rows, labels = [], []
    for rec in df.to_dict("records"):
        y = rec.pop(label_col)
        if str(y) not in index:
            continue
        clean = {c: (None if rec[c] in ("", None) else rec[c]) for c in contract.columns}
        enc = contract.decode(clean).value
        if tuple(np.nan_to_num(enc, nan=-1e9)) not in held:
            rows.append(enc)
            labels.append(index[str(y)])
    pool, labels = np.stack(rows), np.asarray(labels)
    rng = np.random.default_rng(seed)
    shifts = _shifts(contract, pool, labels, rng)

    def tuneserve_fires(window: np.ndarray) -> bool:
        items = [contract.decode(contract.holdout_request(r)) for r in window]
        stats: dict = {}
        outputs, embedding = rt.run(items, stats)
        monitor = Monitor(drift)
        monitor.observe_samples(contract.drift_samples(outputs, embedding, stats))
        return max(monitor.scores().values()) >= 1.0

    levels = list(range(0, WINDOW + 1, step))
    windows, where = [], []  # every window, and (shift, trial, shifted rows)
    for name, shifted in shifts.items():
        for t in range(trials):
            base = pool[rng.choice(len(pool), WINDOW, replace=False)]
            new = shifted(WINDOW)
            for k in levels:
                windows.append(np.concatenate([base[k:], new[:k]]))
                where.append((name, t, k))
    print(f"{len(windows)} windows of {WINDOW} rows: tuneserve ...", flush=True)
    t0 = time.perf_counter()
    fired = {"tuneserve": [tuneserve_fires(w) for w in windows]}
    print(f"  tuneserve: {time.perf_counter() - t0:.0f} s (model, monitor and row decoding)")
    print("Evidently DataDriftPreset ...", flush=True)
    categorical = [f["name"] for f in contract.features if f["kind"] == "categorical"]
    job = {
        "columns": contract.columns,
        "categorical": categorical,
        "reference": [_raw(contract, r) for r in ckpt.holdout_inputs],
        "windows": [[_raw(contract, r) for r in w] for w in windows],
    }
    with tempfile.TemporaryDirectory(prefix="bench-evidently-") as folder:
        job_file, result, script = (Path(folder) / n for n in ("job.json", "out.json", "run.py"))
        job_file.write_text(json.dumps(job))
        script.write_text(RUNNER)
        t0 = time.perf_counter()
        subprocess.run([evidently_python(), script, job_file, result], check=True)
        print(f"  Evidently: {time.perf_counter() - t0:.0f} s for {len(windows)} windows")
        ev = json.loads(result.read_text())
    fired["Evidently (dataset drift: >= 50% of columns)"] = [e["share"] >= 0.5 for e in ev]
    fired["Evidently (any column, p < 0.05)"] = [e["drifted"] >= 1 for e in ev]
    return {"fired": fired, "where": where, "shifts": list(shifts), "levels": levels}


def report(res: dict, trials: int) -> str:
    where, levels = res["where"], res["levels"]
    lines = [
        "| detector | false alarms (unshifted windows) | "
        + " | ".join(f"{s}: detected / median rows to detection" for s in res["shifts"])
        + " |",
        "|---|---:|" + "---:|" * len(res["shifts"]),
    ]
    for name, fired in res["fired"].items():
        unshifted = [f for f, (_, _, k) in zip(fired, where, strict=True) if k == 0]
        cells = [f"{sum(unshifted)}/{len(unshifted)} ({np.mean(unshifted):.1%})"]
        for shift in res["shifts"]:
            delays = []
            for t in range(trials):
                hits = [
                    k
                    for f, (s, tt, k) in zip(fired, where, strict=True)
                    if s == shift and tt == t and k > 0 and f
                ]
                delays.append(min(hits) if hits else None)
            found = [d for d in delays if d is not None]
            median = f"{int(np.median(found))}" if found else "-"
            cells.append(f"{len(found)}/{trials}, {median}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(window {WINDOW} rows; shifted rows checked at {levels[1:]})"
