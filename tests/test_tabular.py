"""Tabular classification with gradient-boosted trees: table layouts and cleaning, the
encoding shared by training and serving, skl2onnx export checked against the trees'
own probabilities, `--init-from`, and a live service (JSON, tritonclient OIP, bad rows as
400s). Tiny tables made here."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from finetune.config import TrainConfig
from finetune.errors import DataError
from tests.conftest import CITIES, make_table, quiet
from tests.test_service import _serve, _stop


@pytest.fixture(scope="module")
def table_run(table_checkpoint):
    """(the run's folder, its result, the exported artifact) of the session's table run."""
    from export.pipeline import export_checkpoint

    tmp, result = table_checkpoint
    art = export_checkpoint(tmp / "run", tmp / "art", name="loans", register=False, log=quiet)
    return tmp, result, art


JSON = {"content-type": "application/json"}


def test_table_is_detected_cleaned_and_split(tmp_path):
    import pandas as pd

    from finetune.data import detect_task
    from finetune.data import load_dataset as load_tabular_dataset

    path = make_table(tmp_path / "t.csv", n=200)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    pd.concat([df, df.iloc[:3]]).to_csv(path, index=False)  # three duplicate rows
    assert detect_task(path) == "tabular-classification"
    ds = load_tabular_dataset(path, TrainConfig())
    c = ds.summary["cleaning"]
    assert c["duplicates"] == 3 and c["constant_columns"] == 1
    assert ds.summary["dropped_columns"] == ["country"] and ds.labels == ["bad", "good"]
    assert ds.summary["label_column"] == "default"
    leak = df.assign(copy=df["default"].map({"bad": "B", "good": "G"}))
    leak.to_csv(path, index=False)
    with pytest.raises(DataError, match="column 'copy' is the label"):
        load_tabular_dataset(path, TrainConfig())


def test_headerless_whitespace_table_numbers_its_columns(tmp_path):
    from finetune.data import detect_task
    from finetune.data import load_dataset as load_tabular_dataset

    rng = np.random.default_rng(1)
    lines = [
        f"A1{rng.integers(1, 4)} {rng.integers(5, 60)} {rng.integers(100, 9000)} {1 + i % 2}"
        for i in range(120)
    ]
    path = tmp_path / "credit.data"
    path.write_text("\n".join(lines) + "\n")
    assert detect_task(path) == "tabular-classification"
    ds = load_tabular_dataset(path, TrainConfig(label_column="-1"))
    assert ds.features == ["0", "1", "2"] and ds.labels == ["1", "2"]
    with pytest.raises(DataError, match="label column '9'"):
        load_tabular_dataset(path, TrainConfig(label_column="9"))


def test_trees_export_with_parity_and_a_threshold(table_run):
    tmp, result, art = table_run
    best = json.loads((tmp / "run" / "metrics.json").read_text())["best"]
    for key in ("val_roc_auc", "val_pr_auc", "val_f1", "val_accuracy"):
        assert 0.0 <= best[key] <= 1.0
    assert best["val_roc_auc"] > 0.8  # the tiny table's risk is learnable
    card = json.loads((art / "card.json").read_text())
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff"] < 1e-4
    assert 0.0 < card["postprocessing"]["threshold"] < 1.0
    assert card["inputs"][0]["shape"] == ["batch", 3]
    assert card["holdout"]["fp32_roc_auc"] == pytest.approx(result["test_roc_auc"], abs=1e-6)
    assert (tmp / "run" / "report" / "pr_curve.png").is_file()
    assert (tmp / "run" / "report" / "calibration.png").is_file()


def test_rows_are_encoded_as_in_training_and_bad_rows_refused(table_run):
    from service.runtime import Runtime
    from tasks.errors import InputError

    rt = Runtime(table_run[2])
    row = {"amount": 500.0, "city": "lima", "age": 40}
    risky = rt.predict([rt.prepare(row)])[0]
    safe = rt.predict([rt.prepare({"amount": 50, "city": "paris", "age": 40})])[0]
    assert risky["label"] == "bad" and safe["label"] == "good"
    unseen = rt.prepare({"amount": None, "city": "tokyo", "age": "41"})  # missing, unseen
    assert np.isnan(unseen.value[0]) and unseen.value[1] == len(CITIES)
    for bad, field in (
        ({"amount": 1, "city": "rome"}, "age"),
        ({**row, "income": 3}, "income"),
        ({**row, "amount": "lots"}, "amount"),
        ({**row, "city": [1]}, "city"),
    ):
        with pytest.raises(InputError, match=field):
            rt.prepare(bad)


def test_init_from_continues_the_trees_and_checks_the_schema(table_run, tmp_path):
    import pandas as pd

    from finetune.train import fine_tune

    tmp, _, _ = table_run
    later = make_table(tmp_path / "next.csv", n=300, seed=7)
    cfg = TrainConfig(test_fraction=0.3, init_from=str(tmp / "run"))
    result = fine_tune(later, tmp_path / "refresh", cfg, log=quiet)
    first = json.loads((tmp / "run" / "config.json").read_text())["head"]["rounds"]
    assert result["epoch"] > first and result["val_roc_auc"] > 0.8
    df = pd.read_csv(later).drop(columns=["age"])
    df.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(DataError, match="missing here age"):
        fine_tune(tmp_path / "other.csv", tmp_path / "bad", cfg, log=quiet)


def test_tree_files_load_with_the_narrowest_trust(table_run, tmp_path):
    """A tree file from someone else (`--init-from`) naming a scikit-learn function: the old
    rule trusted every sklearn.* and numpy.* type the file named, which undid skops'
    allowlist; only the types our tree files hold may load."""
    import shutil

    import skops.io as sio
    from sklearn.utils.validation import check_array

    from finetune.checkpoint import load_trees
    from finetune.errors import CheckpointError

    tmp, _, _ = table_run
    assert load_trees(tmp / "run").n_iter_ > 0
    other = tmp_path / "other"
    shutil.copytree(tmp / "run", other)
    sio.dump({"model": load_trees(tmp / "run"), "hook": check_array}, other / "model.skops")
    with pytest.raises(CheckpointError, match="sklearn.utils.validation.check_array"):
        load_trees(other)
    sio.dump([1, 2], other / "model.skops")  # trusted types, but no trees
    with pytest.raises(CheckpointError, match="not gradient-boosted trees"):
        load_trees(other)


def test_live_service_json_oip_and_bad_rows(table_run, tmp_path):
    import tritonclient.http as triton

    _, _, art = table_run
    proc, url = _serve(art, tmp_path / "serve.log", TUNESERVE_WORKERS="1")
    try:
        rows = [
            {"amount": 500.0, "city": "lima", "age": 40},
            {"amount": None, "city": "x", "age": 30},
        ]
        r = httpx.post(url + "/predict", json={"inputs": rows, "top_k": 2}, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert got[0]["label"] == "bad" and len(got[1]["top_k"]) == 2
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        tensors = []
        for name, values in (
            ("amount", ["500", ""]),
            ("city", ["lima", "x"]),
            ("age", ["40", "30"]),
        ):
            t = triton.InferInput(name, [2], "BYTES")
            t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
            tensors.append(t)
        res = client.infer("loans", tensors)
        assert [x.decode() for x in res.as_numpy("label")] == [p["label"] for p in got]
        # One FP32 [n, features] tensor in the card's column order, categories as indices
        # (binary and JSON), the way Triton's and MLServer's tabular clients send rows.
        card = json.loads((art / "card.json").read_text())
        cities = next(f for f in card["preprocessing"]["features"] if f["name"] == "city")
        lima, other = cities["categories"].index("lima"), len(cities["categories"])
        encoded = np.array([[500.0, lima, 40.0], [np.nan, other, 30.0]], dtype=np.float32)
        for binary in (True, False):
            t = triton.InferInput("features", [2, 3], "FP32")
            t.set_data_from_numpy(encoded, binary_data=binary)
            res = client.infer("loans", [t])
            assert [x.decode() for x in res.as_numpy("label")] == [p["label"] for p in got]
            probs = res.as_numpy("probabilities")
            for row, answer in zip(probs, got, strict=True):
                for entry in answer["top_k"]:
                    assert row[card["labels"].index(entry["label"])] == pytest.approx(
                        entry["score"], abs=1e-6
                    )
        for bad, where in ((encoded[:, :2], "[n, 3]"), (encoded + [0, 0.5, 0], "column 'city'")):
            t = triton.InferInput("features", list(bad.shape), "FP32")
            t.set_data_from_numpy(np.ascontiguousarray(bad, dtype=np.float32))
            with pytest.raises(Exception, match=re.escape(where)):
                client.infer("loans", [t])
        for body in (
            {"inputs": [{"amount": 1, "city": "rome"}]},
            {"inputs": ["a text"]},
            {"inputs": [{"amount": "lots", "city": "rome", "age": 3}]},
            '{"inputs": [{"amount": %s, "city": "rome", "age": 3}]}' % ("9" * 400),
            '{"inputs": [{"amount": 1e400, "city": "rome", "age": 3}]}',
            '{"inputs": [{"amount": Infinity, "city": "rome", "age": 3}]}',
            '{"inputs": %s}' % ("[" * 50_000 + "]" * 50_000),
        ):
            if isinstance(body, dict):
                r = httpx.post(url + "/predict", json=body, timeout=30)
            else:  # what json= cannot send: a 400-digit integer, 1e400, Infinity, nesting
                r = httpx.post(url + "/predict", content=body, timeout=30, headers=JSON)
            assert r.status_code == 400, r.text
            assert "inputs[0]" in r.json()["detail"] or "recursion limit" in r.text, r.text
    finally:
        _stop(proc)


def test_per_column_drift_fires_on_the_shifted_column_only(table_run, tmp_path):
    """The export calibrates one check per column; a window of new rows whose amounts grew
    fires `feature:amount` and not the columns that did not move; rows like the training
    data fire nothing."""
    import pandas as pd

    from service.drift import Monitor
    from service.runtime import Runtime

    rt = Runtime(table_run[2])
    ref = json.loads((table_run[2] / "reference.json").read_text())["drift"]
    assert {"feature:amount", "feature:city", "feature:age"} <= set(ref["thresholds"])

    def scores(path) -> dict:
        rows = pd.read_csv(path, keep_default_na=False).drop(columns=["default", "country"])
        items = [
            rt.prepare({k: (None if v == "" else v) for k, v in r.items()})
            for r in rows.to_dict("records")
        ]
        monitor = Monitor(ref)
        stats: dict = {}
        outputs, embedding = rt.run(items[:200], stats)
        monitor.observe_samples(rt.contract.drift_samples(outputs, embedding, stats))
        return monitor.scores()

    same = scores(make_table(tmp_path / "same.csv", n=200, seed=11))
    assert max(same.values()) < 1.0, same
    shifted = scores(make_table(tmp_path / "shifted.csv", n=200, seed=12, shift=150.0))
    assert shifted["feature:amount"] >= 1.0 and shifted["feature:city"] < 1.0, shifted


def test_mlp_trains_exports_like_the_trees_and_continues(table_run, tmp_path):
    """`--backbone mlp`: embeddings for categories, missing flags; its ONNX graph takes the
    trees' input, so the service answers the same way; `--init-from` continues its weights."""
    from export.pipeline import export_checkpoint
    from finetune.train import fine_tune
    from service.runtime import Runtime

    tmp, _, _ = table_run
    cfg = TrainConfig(backbone="mlp", test_fraction=0.3)
    result = fine_tune(tmp / "loans.csv", tmp_path / "mlp", cfg, log=quiet)
    assert result["strategy"] == "mlp" and result["val_roc_auc"] > 0.8, result
    assert (tmp_path / "mlp" / "report" / "curves.png").is_file()
    art = export_checkpoint(tmp_path / "mlp", tmp_path / "art", name="m", register=False, log=quiet)
    card = json.loads((art / "card.json").read_text())
    assert card["parity"]["passed"] and card["inputs"][0]["shape"] == ["batch", 3]
    assert [o["name"] for o in card["outputs"]] == ["probabilities"]
    rt = Runtime(art)
    risky = rt.predict([rt.prepare({"amount": 600.0, "city": "lima", "age": 40})])[0]
    safe = rt.predict([rt.prepare({"amount": 50, "city": "paris", "age": 40})])[0]
    assert risky["label"] == "bad" and safe["label"] == "good"
    later = make_table(tmp_path / "next.csv", n=300, seed=7)
    again = TrainConfig(test_fraction=0.3, init_from=str(tmp_path / "mlp"))
    refreshed = fine_tune(later, tmp_path / "refresh", again, log=quiet)
    assert refreshed["strategy"] == "mlp" and refreshed["val_roc_auc"] > 0.8
    trees = TrainConfig(backbone="gradient-boosting", init_from=str(tmp_path / "mlp"))
    with pytest.raises(DataError, match="is a mlp run"):
        fine_tune(later, tmp_path / "bad", trees, log=quiet)


def test_numeric_oip_tensors_with_broken_binary_parts_are_400s():
    """A binary part that is not whole elements, or a shape that does not hold the elements,
    is a 400 naming the tensor (numpy would raise a 500 on the first)."""
    from service.errors import InputError
    from service.oip import parse_request

    for size, shape, match in ((7, [1, 2], "not whole FP32"), (12, [1, 2], "does not hold")):
        head = {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
        body = json.dumps(head).encode()
        with pytest.raises(InputError, match=match):
            parse_request(body + b"\0" * size, str(len(body)))
