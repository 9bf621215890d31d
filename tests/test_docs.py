"""The user guide's examples run against a real service (the tiny text model): every curl
request gets an answer of the documented shape (errors: the documented status class and
reason), and every Python example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_service import _serve, _stop

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs/user-guide.md"
DOC_URL, DOC_MODEL = "http://127.0.0.1:3000", "sms_full"


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", GUIDE.read_text(), re.S)


def _section(number: int) -> str:
    """The text of '## <number>. ...' up to the next section."""
    text = GUIDE.read_text()
    start = text.index(f"\n## {number}. ")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _curl_examples(text: str | None = None) -> list[tuple[str, dict, dict]]:
    """(path, request body, documented response) for each curl with a JSON body."""
    blocks = _blocks() if text is None else re.findall(r"```(\w+)\n(.*?)```", text, re.S)
    out = []
    for (lang, code), (next_lang, next_code) in zip(blocks, blocks[1:], strict=False):
        if lang == "bash" and "curl" in code and " -d '" in code:
            path = re.search(re.escape(DOC_URL) + r"(\S+)", code).group(1)
            raw = re.search(r"-d '(.*?)'$", code, re.S | re.M).group(1)
            body = json.loads(raw.replace("""'"'"'""", "'"))  # the shell's quote inside quotes
            assert next_lang == "json", f"the example for {path} has no response after it"
            out.append((path, body, json.loads(next_code)))
    return out


def _same_shape(got, want, where="response") -> None:
    """Same keys, list lengths and value types; numbers and labels may differ."""
    assert type(got) is type(want) or {type(got), type(want)} <= {int, float}, where
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _same_shape(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} items, documented {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_shape(g, w, f"{where}[{i}]")


@pytest.fixture(scope="module")
def doc_server(text_artifact_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "docs.log"
    proc, url = _serve(text_artifact_dir, log, TUNESERVE_WORKERS="1")
    yield url, json.loads((text_artifact_dir / "card.json").read_text())
    _stop(proc)


def test_the_guide_has_examples():
    assert len(_curl_examples()) >= 3
    assert sum(lang == "python" for lang, _ in _blocks()) >= 2


@pytest.mark.parametrize("index", range(3))
def test_curl_examples_answer_as_documented(doc_server, index):
    url, card = doc_server
    path, body, documented = _curl_examples()[index]
    r = httpx.post(url + path.replace(DOC_MODEL, card["name"]), json=body, timeout=30)
    if "error" in documented:
        assert 400 <= r.status_code < 500
        assert r.json() == documented  # errors are deterministic: reason and detail
        return
    assert r.status_code == 200, r.text
    got = r.json()
    documented = json.loads(json.dumps(documented).replace(DOC_MODEL, card["name"]))
    _same_shape(got, documented)
    labels = set(card["labels"])
    if "predictions" in got:
        assert {p["label"] for p in got["predictions"]} <= labels
        assert got["model"] == card["name"] and got["version"] == card["version"]
    else:
        (label,) = [o for o in got["outputs"] if o["name"] == "label"]
        assert set(label["data"]) <= labels


@pytest.mark.parametrize("index", range(2))
def test_python_examples_run(doc_server, index, tmp_path):
    url, card = doc_server
    code = [c for lang, c in _blocks() if lang == "python"][index]
    code = code.replace(DOC_URL, url).replace(DOC_URL.removeprefix("http://"), url[7:])
    script = tmp_path / "example.py"
    script.write_text(code.replace(DOC_MODEL, card["name"]))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert any(label in r.stdout for label in card["labels"]), r.stdout


# --------------------------------------------------------------------------- other tasks

TASK_SECTIONS = {"ner": (5, "conll", 2), "qa": (6, "xquad", 3)}


@pytest.fixture(scope="module", params=list(TASK_SECTIONS))
def task_doc_server(request, tmp_path_factory):
    kind = request.param
    _, art, _ = request.getfixturevalue(f"{kind}_artifact")
    log = tmp_path_factory.mktemp("log") / f"docs-{kind}.log"
    proc, url = _serve(art, log, TUNESERVE_WORKERS="1")
    yield kind, url, json.loads((art / "card.json").read_text())
    _stop(proc)


def test_task_sections_answer_as_documented(task_doc_server):
    """Sections 5 and 6: every curl of the section against a model of that task, answers of
    the documented shape whose offsets index the strings sent."""
    kind, url, card = task_doc_server
    number, doc_model, count = TASK_SECTIONS[kind]
    examples = _curl_examples(_section(number))
    assert len(examples) == count
    for path, body, documented in examples:
        r = httpx.post(url + path.replace(doc_model, card["name"]), json=body, timeout=30)
        if "error" in documented:
            assert r.status_code == 400 and r.json() == documented
            continue
        assert r.status_code == 200, r.text
        got = json.loads(r.text)
        if "predictions" in documented:  # the number of entities depends on the model
            for p, item in zip(got["predictions"], body["inputs"], strict=True):
                for e in p.get("entities", []):
                    assert item[e["start"] : e["end"]] == e["text"]
                if "answer" in p:
                    assert item["context"][p["start"] : p["end"]] == p["answer"]
            assert got["model"] == card["name"] and len(got["predictions"]) == len(body["inputs"])
            assert set(got["predictions"][0]) == set(documented["predictions"][0])
        else:
            names = [(o["name"], o["datatype"]) for o in got["outputs"]]
            assert names == [(o["name"], o["datatype"]) for o in documented["outputs"]]


def test_documented_offsets_index_the_documented_inputs():
    """The guide's own numbers: entity and answer offsets point at their text."""
    for number in (5, 6):
        for _, body, documented in _curl_examples(_section(number)):
            predictions = documented.get("predictions", [])
            for p, item in zip(predictions, body["inputs"] if predictions else [], strict=True):
                for e in p.get("entities", []):
                    assert item[e["start"] : e["end"]] == e["text"], e
                if "answer" in p:
                    assert item["context"][p["start"] : p["end"]] == p["answer"], p
            for o in documented.get("outputs", []):
                if o["name"] == "entities":
                    text = body["inputs"][0]["data"][0]
                    for e in json.loads(o["data"][0]):
                        assert text[e["start"] : e["end"]] == e["text"], e
