"""Task quality of an exported artifact on held-out data, the way a user would check it:
`python bench/quality.py --artifact artifacts/conll/v1 --data ../shared/data/conll2003/test.txt
[--serve]`.

Scores every precision of the artifact (fp32 and its variants) through the serving path
(`service.runtime.Runtime`: windows, post-processing), with the task's own metric (seqeval
entity F1, SQuAD exact match / F1, accuracy); with `--serve`, also through a live
`bentoml serve` over HTTP (the answers' JSON turned back into the metric's input), so that the
served figure can be compared with the exported one. Data: a CoNLL file (entities), SQuAD
JSON (questions; `--val-split` re-draws the run's validation articles), a table (classes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # after the project: bench/export.py is not `export`
sys.path.insert(0, str(ROOT))


def load_examples(card: dict, data: Path, val_split: bool) -> tuple[list, list]:
    """(request values, gold targets) for the artifact's task."""
    from collections import Counter

    from finetune.config import TrainConfig
    from finetune.data import load_dataset
    from finetune.data.spans import load_sentences

    task = card["task"]
    if task == "token-classification":
        rows = load_sentences(data, Counter())
        return [t for t, _ in rows], [g for _, g in rows]
    training = json.loads((Path(card["training"]["checkpoint"]) / "config.json").read_text())
    cfg = TrainConfig.from_dict(training["training"])
    ds = load_dataset(data, cfg)
    split = ds.val if val_split else ds.train
    if task == "question-answering":
        return [json.loads(x) for x in split.inputs], [t["answers"] for t in split.targets]
    return list(split.inputs), [int(y) for y in split.labels]


def score_runtime(folder: Path, precision: str, values: list, golds: list, batch: int = 32):
    from service.runtime import Runtime

    rt = Runtime(folder, precision=precision)
    t0 = time.perf_counter()
    outputs = []
    for s in range(0, len(values), batch):
        outputs.extend(rt.run([rt.prepare(v) for v in values[s : s + batch]])[0])
    seconds = time.perf_counter() - t0
    return rt.contract.score(outputs, golds), seconds, rt


def score_served(folder: Path, values: list, golds: list, contract) -> tuple[dict, str]:
    """The same inputs through `bentoml serve`, scored from the JSON answers."""
    import httpx
    from serve import free_port, python_path, start, stop, wait_ready

    from tasks.token_classification import tags_from_entities

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="quality-"))
    svc = start(
        [sys.executable, "-m", "bentoml", "serve", "--port", str(port)],
        {"TUNESERVE_MODEL": str(folder), "PYTHONPATH": python_path()},
        tmp / "svc.log",
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", svc)
        answers = []
        for s in range(0, len(values), 32):
            r = httpx.post(
                f"http://127.0.0.1:{port}/predict", json={"inputs": values[s : s + 32]}, timeout=120
            )
            r.raise_for_status()
            answers.extend(r.json()["predictions"])
        info = [
            line
            for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
            if line.startswith("tuneserve_model_info{")
        ]
        precision = info[0].split('precision="')[1].split('"')[0] if info else "?"
    finally:
        stop(svc)
    task = contract.name
    if task == "token-classification":
        from tasks.metrics import entity_scores

        pred = [tags_from_entities(v, a["entities"]) for v, a in zip(values, answers, strict=True)]
        return entity_scores(golds, pred), precision
    if task == "question-answering":
        from tasks.metrics import squad_scores

        return squad_scores([a["answer"] for a in answers], golds), precision
    index = {c: i for i, c in enumerate(contract.labels)}
    hits = [index[a["label"]] == g for a, g in zip(answers, golds, strict=True)]
    return {"accuracy": sum(hits) / len(hits)}, precision


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifact", required=True, help="exported artifact folder")
    p.add_argument("--data", required=True, help="held-out data (CoNLL file, SQuAD JSON, table)")
    p.add_argument("--val-split", action="store_true", help="SQuAD/tables: the run's val split")
    p.add_argument("--serve", action="store_true", help="also score a live bentoml serve")
    args = p.parse_args()
    from export.card import load_card

    folder = Path(args.artifact)
    card = load_card(folder)
    values, golds = load_examples(card, Path(args.data), args.val_split)
    metric = card["holdout"].get("metric", "accuracy")
    print(f"{card['name']}:{card['version']} ({card['task']}), {len(values)} inputs of {args.data}")
    precisions = ["fp32"] + [v["precision"] for v in card["variants"] if v["precision"] != "fp16"]
    contract = None
    for precision in precisions:
        scores, seconds, rt = score_runtime(folder, precision, values, golds)
        contract = rt.contract
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
        print(
            f"  exported {precision:<5} {shown}  ({seconds:.1f} s, {len(values) / seconds:.1f}/s)"
        )
        if "per_type" in scores:
            print("    per type:", {k: round(v["f1"], 4) for k, v in scores["per_type"].items()})
    for r in card.get("rejected_variants", []):
        print(f"  rejected {r['precision']}: {r['reason']}")
    if args.serve:
        t0 = time.perf_counter()
        scores, precision = score_served(folder, values, golds, contract)
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
        print(
            f"  served {precision:<5} {shown}  (bentoml serve over HTTP, "
            f"{time.perf_counter() - t0:.1f} s with start-up)"
        )
    print(f"metric: {metric}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
