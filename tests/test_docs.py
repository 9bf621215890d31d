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


def _curl_examples() -> list[tuple[str, dict, dict]]:
    """(path, request body, documented response) for each curl with a JSON body."""
    blocks, out = _blocks(), []
    for (lang, code), (next_lang, next_code) in zip(blocks, blocks[1:], strict=False):
        if lang == "bash" and "curl" in code and " -d '" in code:
            path = re.search(re.escape(DOC_URL) + r"(\S+)", code).group(1)
            body = json.loads(re.search(r"-d '(.*?)'", code, re.S).group(1))
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
    proc, url = _serve(text_artifact_dir, tmp_path_factory.mktemp("log") / "docs.log")
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
