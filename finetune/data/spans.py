"""Data of the span tasks (DESIGN.md §1): named entities and extractive question answering.

- token classification: CoNLL column files (`token ... TAG`, the tag in the last column,
  columns separated by spaces or tabs, a blank or whitespace-only line between sentences,
  `-DOCSTART-` lines skipped), or JSONL `{"tokens": [...], "tags": [...]}`; IOB1, IOB2 and
  BIOES tags, converted to IOB2; a folder with `train.*` and `valid.*`/`dev.*`/`test.*` is
  pre-split. Each sentence becomes the text of its tokens joined by single spaces.
- question answering: SQuAD v1.1 / v2.0 JSON; an answer whose `answer_start` does not point
  at its text is realigned to the nearest occurrence, or dropped; the validation split is by
  article (or context), never by question.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from finetune.data.dataset import Dataset, Split, split_summary
from finetune.data.splits import ROLES, three_way
from finetune.errors import DataError

NER_TASK, QA_TASK = "token-classification", "question-answering"
TAG = re.compile(r"^(O|[BIES]-\S+)$")
CONLL_EXTS = {".txt", ".conll", ".conllu", ".iob", ".iob2", ".bio", ".bioes", ".tsv", ""}
SPLIT_STEMS = {
    "train": "train",
    "training": "train",
    "valid": "val",
    "val": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}


# --------------------------------------------------------------------------- detection


def _sniff_lines(path: Path, n: int = 200) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for _, line in zip(range(n), f, strict=False)]
    except OSError:
        return []


def is_conll(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() not in CONLL_EXTS:
        return False
    rows = [ln.split() for ln in _sniff_lines(path) if ln.strip()]
    rows = [r for r in rows if r[0] != "-DOCSTART-"]
    return len(rows) >= 1 and sum(
        len(r) >= 2 and bool(TAG.match(r[-1])) for r in rows
    ) >= 0.9 * len(rows)


def is_token_jsonl(path: Path) -> bool:
    if path.suffix.lower() not in (".jsonl", ".ndjson", ".json") or not path.is_file():
        return False
    first = next((ln for ln in _sniff_lines(path, 5) if ln.strip()), "")
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and "tokens" in obj and ("tags" in obj or "ner_tags" in obj)


def is_squad(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    return '"data"' in head and ('"paragraphs"' in head or '"title"' in head or '"version"' in head)


def span_task(path: Path) -> tuple[str, dict[str, Path]] | None:
    """(task, {"train": file, "val": file, "test": file}) for span-task data, else None."""
    found = _span_format(path)
    return None if found is None else found[:2]


def _span_format(path: Path):
    """(task, files, loader) of span-task data at `path`, else None."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for task, test, loader in SNIFFS:
        hits = [p for p in files if test(p)]
        if not hits:
            continue
        if path.is_file():
            return task, {"train": path}, loader
        split = {}
        for p in hits:
            kind = SPLIT_STEMS.get(p.stem.lower())
            if kind and kind not in split:
                split[kind] = p
        if "train" in split:
            return task, split, loader
        if len(hits) == 1:
            return task, {"train": hits[0]}, loader
    return None


def detect(path: Path) -> str | None:
    found = span_task(path) if path.exists() else None
    return None if found is None else found[0]


def load(path: Path, cfg, image_prep=None) -> Dataset:
    """The Dataset of a span task (inputs and JSON targets), in the three splits of
    data/splits.py."""
    task, files, loader = _span_format(path)
    counts: Counter = Counter()
    parts, labels, split, summary = loader(path, files, cfg, counts)
    for role in ("val", "test"):
        if not parts[role]:
            raise DataError(f"'{path}' leaves no {role} examples after cleaning")
    ds = Dataset(task, labels, *(split(parts[role]) for role in ROLES))
    ds.summary = {
        "path": str(path),
        "layout": summary.pop("layout"),
        "files": {k: str(v) for k, v in files.items()},
        **split_summary(files, ds, None),
        "train_per_class": summary.pop("train_per_class"),
        "counted": summary.pop("counted"),
        "cleaning": {**{k: int(v) for k, v in sorted(counts.items())}, "undecodable_files": []},
        **summary,
    }
    return ds


# --------------------------------------------------------------------------- tags


def to_iob2(tags: list[str], counts: Counter) -> list[str]:
    """IOB1 (I- opens an entity unless it continues one; B- only between two) and BIOES
    (S- single, E- end) → IOB2."""
    out = []
    for i, tag in enumerate(tags):
        kind = tag[2:]
        prev = out[i - 1] if i else "O"
        if tag.startswith("S-"):
            tag = "B-" + kind
        elif tag.startswith("E-"):
            tag = "I-" + kind
        if tag.startswith("I-") and (prev == "O" or prev[2:] != kind):
            tag = "B-" + kind  # IOB1 (or a broken sequence): an entity starts here
        if tag != tags[i]:
            counts["tags_converted"] += 1
        out.append(tag)
    return out


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    sentences, tokens, tags = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                if tokens:
                    sentences.append((tokens, tags))
                tokens, tags = [], []
                continue
            if cols[0] == "-DOCSTART-":
                continue
            if len(cols) < 2 or not TAG.match(cols[-1]):
                raise DataError(
                    f"'{path}' line {n}: expected 'token ... TAG' with an O, B-, I-, E- or S- "
                    f"tag in the last column, got {line.strip()[:80]!r}"
                )
            tokens.append(cols[0])
            tags.append(cols[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def read_token_jsonl(path: Path) -> list[tuple[list[str], list[str]]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                tokens, tags = obj["tokens"], obj.get("tags", obj.get("ner_tags"))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(
                    f"'{path}' line {n}: not a {{'tokens', 'tags'}} object ({e})"
                ) from None
            if len(tokens) != len(tags):
                raise DataError(f"'{path}' line {n}: {len(tokens)} tokens but {len(tags)} tags")
            bad = [t for t in tags if not isinstance(t, str) or not TAG.match(t)]
            if bad:
                raise DataError(f"'{path}' line {n}: tag {bad[0]!r} is not O, B-, I-, E- or S-")
            out.append(([str(t) for t in tokens], list(tags)))
    return out


def load_sentences(path: Path, counts: Counter) -> list[tuple[str, list[str]]]:
    """(text, IOB2 tags per token) per sentence; tokens with spaces inside have them removed
    (the text is the tokens joined by single spaces)."""
    raw = read_token_jsonl(path) if is_token_jsonl(path) else read_conll(path)
    out = []
    for tokens, tags in raw:
        if not tokens:
            counts["empty_sentences"] += 1
            continue
        clean = ["".join(t.split()) or "_" for t in tokens]
        counts["tokens_with_spaces"] += sum(c != t for c, t in zip(clean, tokens, strict=True))
        out.append((" ".join(clean), to_iob2(tags, counts)))
    return out


# --------------------------------------------------------------------------- SQuAD


def _realign(context: str, text: str, start, counts: Counter) -> int | None:
    if isinstance(start, int) and context[start : start + len(text)] == text:
        return start
    found = [m.start() for m in re.finditer(re.escape(text), context)] if text else []
    if not found:
        counts["answers_dropped"] += 1
        return None
    counts["answers_realigned"] += 1
    ref = start if isinstance(start, int) else 0
    return min(found, key=lambda s: abs(s - ref))


def load_squad(path: Path, counts: Counter) -> list[dict]:
    """One record per question: question, context, answers [{text, start}], group (article)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        articles = doc["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{path}' is not SQuAD JSON (data[].paragraphs[].qas[]): {e}") from e
    out = []
    for ai, art in enumerate(articles):
        for pi, par in enumerate(art.get("paragraphs", [])):
            context = par.get("context", "")
            if not isinstance(context, str) or not context.strip():
                counts["empty_contexts"] += 1
                continue
            for qa in par.get("qas", []):
                q = str(qa.get("question", "")).strip()
                if not q:
                    counts["empty_questions"] += 1
                    continue
                answers = []
                for a in qa.get("answers", []):
                    start = _realign(context, str(a.get("text", "")), a.get("answer_start"), counts)
                    if start is not None:
                        answers.append({"text": a["text"], "start": start})
                impossible = bool(qa.get("is_impossible", False))
                if not answers and not impossible:
                    counts["questions_without_answer"] += 1
                    continue
                out.append(
                    {
                        "question": q,
                        "context": context,
                        "answers": answers,
                        "group": art.get("title") or f"{path.name}:{ai}:{pi}",
                        "id": str(qa.get("id", f"{ai}-{pi}-{len(out)}")),
                    }
                )
    return out


# --------------------------------------------------------------------------- datasets


def _entities(path: Path, files: dict[str, Path], cfg, counts: Counter):
    """Sentences with IOB2 tags: (parts, labels, split, summary)."""
    parts = {k: load_sentences(p, counts) for k, p in files.items()}
    seen, kept = set(), []
    for text, tags in parts["train"]:
        if text in seen:
            counts["duplicates"] += 1
            continue
        seen.add(text)
        kept.append((text, tags))
    parts["train"] = kept
    parts = three_way(parts, cfg, str(path), key=lambda row: row[0], counts=counts)
    train = parts["train"]
    if len(train) < 2:
        raise DataError(f"'{path}' has too few sentences ({len(train)} train)")
    labels = sorted({t for _, tags in train for t in tags}, key=lambda t: (t != "O", t[2:], t))
    if labels == ["O"]:
        raise DataError(f"'{path}' has no entity tags (every tag is O)")
    known = set(labels)
    for role in ("val", "test"):
        before = len(parts[role])
        parts[role] = [(t, g) for t, g in parts[role] if set(g) <= known]
        counts[f"unknown_{role}_tags"] = before - len(parts[role])

    def split(rows) -> Split:
        return Split(
            [t for t, _ in rows],
            np.zeros(len(rows), dtype=np.int64),
            [{"tags": g} for _, g in rows],
        )

    entity_counts = Counter(t[2:] for _, g in train for t in g if t.startswith("B-"))
    summary = {
        "layout": "conll",
        "train_per_class": dict(sorted(entity_counts.items())),
        "counted": "entity types",
    }
    return parts, labels, split, summary


def _answers(path: Path, files: dict[str, Path], cfg, counts: Counter):
    """Questions on contexts, split by article: (parts, labels, split, summary)."""
    parts = {k: load_squad(p, counts) for k, p in files.items()}
    if len({r["group"] for r in parts["train"]}) < 2:
        for r in parts["train"]:
            r["group"] = r["context"]
    parts = three_way(
        parts,
        cfg,
        str(path),
        key=lambda r: r["context"],
        group=lambda r: r["group"],
        counts=counts,
    )
    train = parts["train"]

    def split(rows) -> Split:
        return Split(
            [json.dumps({"question": r["question"], "context": r["context"]}) for r in rows],
            np.zeros(len(rows), dtype=np.int64),
            [
                {
                    "answers": [a["text"] for a in r["answers"]],
                    "starts": [a["start"] for a in r["answers"]],
                }
                for r in rows
            ],
        )

    summary = {
        "layout": "squad",
        "train_per_class": {
            "answerable": sum(bool(r["answers"]) for r in train),
            "unanswerable": sum(not r["answers"] for r in train),
        },
        "counted": "kinds of question",
        "groups": {role: len({r["group"] for r in parts[role]}) for role in ROLES},
    }
    return parts, ["answer"], split, summary


SNIFFS = (  # (task, a test of one file, its loader), tried in this order
    (QA_TASK, is_squad, _answers),
    (NER_TASK, is_conll, _entities),
    (NER_TASK, is_token_jsonl, _entities),
)
