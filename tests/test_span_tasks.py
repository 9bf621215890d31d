"""The span tasks (token classification, question answering) through every stage: data
formats, metrics against their references, fine-tune → export (parity at several batch
sizes and lengths) → Runtime (offsets into the original strings, long inputs in windows) →
a live BentoML server (JSON, Open Inference Protocol with tritonclient, bad inputs, drift
gauges). Tiny random BERT and tiny data made here."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.conftest import LOC, PER, make_squad, run_main
from tests.test_service import _serve, _stop, drift_checks, drift_checks_scored

# --------------------------------------------------------------------------- data and metrics

JSON = {"content-type": "application/json"}


def test_conll_formats_and_tag_schemes(tmp_path):
    from collections import Counter

    from finetune.data.spans import load_sentences, span_task, to_iob2

    f = tmp_path / "train.txt"
    f.write_text(
        "-DOCSTART- -X- O\n\nAlice NNP\tI-PER\nSmith NNP I-PER\nwins VBZ O\n \t\n"
        "New S-LOC\n\nRio B-LOC\nde I-LOC\nJaneiro E-LOC\n"
    )
    counts = Counter()
    rows = load_sentences(f, counts)
    assert rows == [
        ("Alice Smith wins", ["B-PER", "I-PER", "O"]),
        ("New", ["B-LOC"]),
        ("Rio de Janeiro", ["B-LOC", "I-LOC", "I-LOC"]),
    ]
    assert counts["tags_converted"] == 3  # IOB1 I- → B-, S- → B-, E- → I-
    assert to_iob2(["I-ORG", "I-ORG", "B-ORG", "O", "I-PER"], Counter()) == [
        "B-ORG",
        "I-ORG",
        "B-ORG",
        "O",
        "B-PER",
    ]
    (tmp_path / "valid.txt").write_text("Bob B-PER\n")
    assert span_task(tmp_path) == (
        "token-classification",
        {"train": f, "val": tmp_path / "valid.txt"},
    )
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"tokens": ["Bob", "runs"], "tags": ["B-PER", "O"]}) + "\n")
    assert span_task(j)[0] == "token-classification"
    bad = tmp_path / "bad" / "train.txt"
    bad.parent.mkdir()
    bad.write_text("Bob B-PER\nruns X-Y\n")
    from finetune.errors import DataError

    with pytest.raises(DataError, match="line 2"):
        load_sentences(bad, Counter())


def test_entity_merge_follows_seqeval():
    from seqeval.metrics.sequence_labeling import get_entities

    from tasks.token_classification import merge

    rng = np.random.default_rng(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(300):
        seq = list(rng.choice(tags, int(rng.integers(1, 12))))
        assert merge(seq) == get_entities(seq), seq


def test_squad_metrics_and_cleaning(tmp_path):
    from collections import Counter

    from finetune.data.spans import load_squad
    from tasks.metrics import squad_scores

    scores = squad_scores(["The Eiffel Tower!", "in Paris", ""], [["Eiffel tower"], ["Paris"], []])
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    doc = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "a cat and a dog and a cat",
                        "qas": [
                            {
                                "id": "1",
                                "question": "what?",
                                "answers": [{"text": "cat", "answer_start": 20}],
                            },
                            {
                                "id": "2",
                                "question": "who?",
                                "answers": [{"text": "cow", "answer_start": 0}],
                            },
                            {
                                "id": "3",
                                "question": "ok?",
                                "answers": [{"text": "dog", "answer_start": 12}],
                            },
                        ],
                    }
                ],
            }
        ]
    }
    f = tmp_path / "s.json"
    f.write_text(json.dumps(doc))
    counts = Counter()
    rows = load_squad(f, counts)
    assert [r["answers"][0]["start"] for r in rows] == [22, 12]  # nearest "cat"; cow dropped
    assert counts["answers_realigned"] == 1 and counts["answers_dropped"] == 1


def test_question_answering_split_is_by_article(tmp_path):
    from finetune.config import TrainConfig
    from finetune.data import load_dataset

    ds = load_dataset(make_squad(tmp_path / "s.json"), TrainConfig())
    contexts = [{json.loads(x)["context"] for x in s.inputs} for s in (ds.train, ds.val)]
    assert contexts[0] and contexts[1] and not contexts[0] & contexts[1]
    assert ds.summary["groups"]["val"] >= 1


# --------------------------------------------------------------------------- every stage


CASES = {
    "ner": ("token-classification", 16, "alice met bob in paris at acme ."),
    "qa": (
        "question-answering",
        24,
        {
            "question": "where does alice live ?",
            "context": "alice lives in rome and works for acme .",
        },
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def span_artifact(request):
    """(kind, run folder, artifact folder, best metrics) for each span task."""
    kind = request.param
    run, art, result = request.getfixturevalue(f"{kind}_artifact")
    return kind, run, art, result


def test_finetune_writes_the_task_metrics(span_artifact):
    from finetune import checkpoint

    kind, run, _, result = span_artifact
    keys = {"ner": ["val_entity_f1"], "qa": ["val_exact_match", "val_f1"]}[kind]
    best = checkpoint.read_json(run / "metrics.json")["best"]
    assert all(0.0 <= best[k] <= 1.0 for k in keys + ["val_loss"] if k != "val_loss")
    assert best["val_loss"] > 0 and (run / "report/curves.png").stat().st_size > 1000
    ckpt = checkpoint.load_checkpoint(run)
    assert ckpt.holdout_targets is not None and len(ckpt.holdout_targets) == len(
        ckpt.holdout_inputs
    )


def test_export_card_parity_and_gate(span_artifact):
    from export.card import SCHEMA_VERSION, load_card

    kind, _, art, _ = span_artifact
    card = load_card(art)
    assert card["schema_version"] == SCHEMA_VERSION == 2
    assert card["parity"]["passed"] and len(card["parity"]["batch_sizes"]) >= 3
    assert len(card["parity"]["sequence_lengths"]) >= 3  # longest, a short and the max length
    names = [o["name"] for o in card["outputs"]]
    assert names[-1] == "pooled_embedding" and len(names) == (2 if kind == "ner" else 3)
    metric = card["holdout"]["metric"]
    assert f"fp32_{metric}" in card["holdout"]
    for v in card["variants"]:
        assert f"holdout_{metric}" in v and f"{metric}_drop" in v
    ref = json.loads((art / "reference.json").read_text())
    assert ref["drift"]["checks"] == ref["checks"] and "thresholds" in ref["drift"]


def test_perturbed_weights_fail_parity(span_artifact):
    import onnxruntime as ort
    import torch

    from export.errors import ParityError
    from export.parity import check_parity
    from export.preprocess import Feeder
    from finetune import checkpoint

    _, run, art, _ = span_artifact
    ckpt = checkpoint.load_checkpoint(run)
    model = checkpoint.build_model(ckpt)
    from export.convert import graph_for

    graph = graph_for(model, ckpt.task)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(ParityError):
        check_parity(graph, sess, Feeder(ckpt))


def _long_input(kind: str):
    if kind == "ner":
        return " ".join(["alice  met bob in paris at acme ."] * 6)  # double space: offsets
    ctx = " ".join(f"{p} lives in {c} and works for acme ." for p, c in zip(PER, LOC, strict=True))
    return {"question": "where does carol live ?", "context": ctx * 2}


def test_runtime_offsets_index_the_original_strings(span_artifact):
    from service.runtime import Runtime

    kind, _, art, _ = span_artifact
    # fp32: the fixture forces an int8 variant (max_accuracy_drop=1.0), and dynamic int8
    # quantizes activations per call, so a window's scores move with its batch neighbours.
    rt = Runtime(art, precision="fp32")
    short, long = CASES[kind][2], _long_input(kind)
    items = [rt.prepare(short), rt.prepare(long)]
    out = rt.predict(items)
    alone = [rt.predict([i])[0] for i in items]  # batching changes nothing but rounding
    assert all(_same(a, b) for a, b in zip(out, alone, strict=True))
    if kind == "ner":
        assert rt.contract.encode([long])[0][1:], "the long text must need windows"
        for text, answer in zip((short, long), out, strict=True):
            for e in answer["entities"]:
                assert text[e["start"] : e["end"]] == e["text"] and e["label"] in (
                    "PER",
                    "LOC",
                    "ORG",
                )
    else:
        assert len(rt.contract.encode([tuple(items[1].value)])[0]) > 1
        for item, answer in zip((short, long), out, strict=True):
            assert item["context"][answer["start"] : answer["end"]] == answer["answer"]
            assert 0.0 <= answer["score"] <= 1.0


@pytest.fixture(scope="module")
def span_server(span_artifact, tmp_path_factory):
    kind, _, art, _ = span_artifact
    proc, url = _serve(
        art,
        tmp_path_factory.mktemp("log") / f"{kind}.log",
        TUNESERVE_WORKERS="1",
        TUNESERVE_DRIFT_INTERVAL_S="1",
    )
    yield kind, art, url
    _stop(proc)


def test_service_json_oip_bad_inputs_and_drift(span_server):
    import tritonclient.http as triton

    from service.runtime import Runtime

    kind, art, url = span_server
    rt = Runtime(art)
    inputs = [CASES[kind][2], _long_input(kind)]
    expected = rt.predict([rt.prepare(v) for v in inputs])
    r = httpx.post(url + "/predict", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert json.dumps(got) == json.dumps(expected) or all(
        _same(a, b) for a, b in zip(got, expected, strict=True)
    )

    name = art.parent.name
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    meta = client.get_model_metadata(name)
    if kind == "ner":
        assert [i["name"] for i in meta["inputs"]] == ["INPUT"]
        t = triton.InferInput("INPUT", [2], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in inputs], dtype=np.object_))
        res = client.infer(name, [t])
        assert [json.loads(x) for x in res.as_numpy("entities")] == [p["entities"] for p in got]
    else:
        assert [i["name"] for i in meta["inputs"]] == ["question", "context"]
        tensors = []
        for field in ("question", "context"):
            t = triton.InferInput(field, [2], "BYTES")
            t.set_data_from_numpy(np.array([v[field].encode() for v in inputs], dtype=np.object_))
            tensors.append(t)
        res = client.infer(name, tensors)
        assert [a.decode() for a in res.as_numpy("answer")] == [p["answer"] for p in got]
        assert res.as_numpy("start").tolist() == [p["start"] for p in got]
        with pytest.raises(Exception, match="question"):
            client.infer(name, tensors[1:])

    bad = {
        "ner": [
            {"inputs": [""]},
            {"inputs": [{"question": "q", "context": "c"}]},
            {"inputs": ["x"], "top_k": 2},
            {"inputs": ["alice \ud800 met bob"]},  # a lone surrogate: 500 from the tokenizer
        ],
        "qa": [
            {"inputs": [{"context": "alice lives in rome ."}]},
            {"inputs": ["alice met bob"]},
            {"inputs": [{"question": "", "context": "c"}]},
            {"inputs": [{"question": "q", "context": "c", "extra": 1}]},
            {"inputs": [{"question": "\udfff?", "context": "c"}]},
        ],
    }[kind]
    for body in bad:  # json.dumps: httpx's json= cannot send a lone surrogate (\ud800)
        r = httpx.post(url + "/predict", content=json.dumps(body), timeout=30, headers=JSON)
        assert r.status_code == 400 and r.json()["error"], (body, r.text)
    if kind == "qa":  # longer than a window can hold beside the stride: the tokenizer panicked
        long_question = {"question": " ".join(["who"] * 60), "context": "alice met bob ."}
        r = httpx.post(url + "/predict", json={"inputs": [long_question]}, timeout=30)
        assert r.status_code == 413 and r.json()["error"] == "question_too_long", r.text

    # A full drift window (200) of the holdout's kind of input: every check of the task scored.
    assert drift_checks_scored(url, art, inputs[0]) == drift_checks(art)


def _same(a: dict, b: dict) -> bool:
    """Equal answers up to float rounding of the scores."""
    if "entities" in a:
        return len(a["entities"]) == len(b["entities"]) and all(
            {k: v for k, v in x.items() if k != "score"}
            == {k: v for k, v in y.items() if k != "score"}
            and abs(x["score"] - y["score"]) < 2e-3
            for x, y in zip(a["entities"], b["entities"], strict=True)
        )
    return {k: v for k, v in a.items() if k != "score"} == {
        k: v for k, v in b.items() if k != "score"
    } and abs(a["score"] - b["score"]) < 2e-3


def test_entity_drift_checks_fire_on_shifted_text_not_on_holdout(ner_artifact):
    """The calibrated checks of the entity model: in-distribution texts (the holdout, replayed)
    stay under the thresholds (a statistic tied at its threshold does not fire); texts of
    other words move the entity-count check past its threshold."""
    from finetune import checkpoint
    from service.drift import Monitor
    from service.runtime import Runtime

    run, art, _ = ner_artifact
    rt = Runtime(art, precision="fp32")  # the precision export measured the reference with
    drift = json.loads((art / "reference.json").read_text())["drift"]
    assert set(drift["thresholds"]) == {
        "prediction",
        "confidence",
        "embedding",
        "input",
        "entities",
    }
    texts = [str(t) for t in checkpoint.load_checkpoint(run).holdout_inputs]
    rng = np.random.default_rng(1)

    def scores(batch: list[str]) -> dict:
        monitor = Monitor(drift)
        for s in range(0, len(batch), 50):
            stats: dict = {}
            outputs, emb = rt.run([rt.prepare(t) for t in batch[s : s + 50]], stats)
            monitor.observe_samples(rt.contract.drift_samples(outputs, emb, stats))
        return monitor.scores()

    same = scores([texts[i] for i in rng.integers(0, len(texts), drift["window"])])
    assert max(same.values()) < 1.0, same
    plain = " ".join(rng.choice(["the", "today", "and", "works", "in"], 8))
    shifted = scores([plain] * drift["window"])
    assert shifted["entities"] >= 1.0, shifted


def _with_article(path, context: str, question: str, answer: str):
    """The SQuAD file at `path` with one more article (one question) appended."""
    data = json.loads(path.read_text())
    qa = {"id": "extra", "question": question}
    qa["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
    data["data"].append({"title": "extra", "paragraphs": [{"context": context, "qas": [qa]}]})
    path.write_text(json.dumps(data))
    return path


def test_text_limits_are_the_models_and_unreadable_data_stops_at_load(span_bert, tmp_path):
    """A context of 25,000 characters (a whole paper): the run trains on it and the model
    serves such contexts (the service's default used to refuse it at validation, after the
    first epoch, with a traceback). A limit below the data's, a question longer than the
    windows hold and a stride past max_length / 2 stop the CLI at load, with one line."""
    import tasks
    from finetune.checkpoint import read_json

    paper = " ".join(f"{PER[i % len(PER)]} lives in {LOC[i % len(LOC)]} ." for i in range(1000))
    paper = paper[:24_990] + " bob works in rome ."
    data = _with_article(make_squad(tmp_path / "squad.json", articles=12), paper, "where ?", "rome")
    common = ["--backbone", str(span_bert), "--max-length", "24", "--stride", "4", "--epochs", "1"]

    r = run_main("finetune", str(data), "--out", str(tmp_path / "low"), *common,
                 "--max-text-chars", "20000")  # fmt: skip
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"longer than --max-text-chars 20000 (the longest has {len(paper)}" in r.stderr

    r = run_main("finetune", str(data), "--out", str(tmp_path / "run"), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    config = read_json(tmp_path / "run" / "config.json")
    assert config["preprocessing"]["max_text_chars"] == len(paper)
    served = tasks.create(config, limits=tasks.Limits(max_text_chars=0)).limits.max_text_chars
    assert served == len(paper)
    assert (
        tasks.create(config, limits=tasks.Limits(max_text_chars=500)).limits.max_text_chars == 500
    )

    wordy = _with_article(make_squad(tmp_path / "q.json", articles=12), "bob lives in rome .",
                          " ".join(["where"] * 40) + " ?", "rome")  # fmt: skip
    r = run_main("finetune", str(wordy), "--out", str(tmp_path / "q"), *common)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "1 question_too_long" in r.stderr and "at most" in r.stderr

    r = run_main("finetune", str(data), "--out", str(tmp_path / "s"), *common[:4], "--stride", "20")
    assert r.returncode != 0 and "stride must be from 0 to max_length / 2 = 12" in r.stderr
