"""Entities and answers in the shared loop: windows of each example labelled by the task
contract (`tasks/`), batched by similar length; evaluation through the contract's own
post-processing and metrics around the PyTorch model, so the figures are those export and
the service reproduce.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import torch
from torch import nn
from torch.utils.data import DataLoader

import tasks
from finetune.data import Dataset
from finetune.errors import DataError
from finetune.models import SpanExtractor, TokenTagger, collate_windows
from finetune.recipes.base import EVAL_BATCH, EncoderRecipe, Setup, torch_session
from tasks.base import DEFAULT_TEXT_CHARS
from tasks.common import INPUT_ORDER, text_tokenizer
from tasks.errors import InputError

PARTS = ("train", "val", "test")


class LengthGroupedBatches:
    """Shuffled batches of windows of similar length (less padding, about 2x faster on
    CoNLL sentences): random pools of 50 batches, each sorted by length and cut. Under
    torchrun each process takes every `world`-th batch (equal counts: DDP steps together)."""

    def __init__(self, lengths: list[int], batch_size: int, gen, dist, pool: int = 50):
        self.lengths, self.batch_size, self.gen, self.pool = lengths, batch_size, gen, pool
        self.dist = dist

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size // self.dist.world

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        size = self.batch_size * self.pool
        batches = []
        for s in range(0, len(order), size):
            chunk = sorted(order[s : s + size], key=lambda i: self.lengths[i])
            batches += [
                chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)
            ]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=self.gen).tolist()]
        yield from shuffled[self.dist.rank :: self.dist.world][: len(self)]


class SpanRecipe(EncoderRecipe):
    """Entities and answers: windows of each example labelled by the task contract."""

    @classmethod
    def windows(cls, cfg) -> dict:
        """Consecutive windows of a long text share `stride` tokens; the model takes texts of
        up to `max_text_chars` (the service's limit for it)."""
        stride = cfg.stride if cfg.stride else cfg.max_length // 4
        return {"stride": stride, "max_text_chars": cfg.max_text_chars}

    @staticmethod
    def texts(raw: str) -> list[str]:
        """The texts of one data input (a sentence; a question and a context)."""
        return [raw]

    @classmethod
    def loaded(cls, cfg, ds: Dataset, log):
        """The model's text limit: the data's longest text (at least the default), or the
        one asked for, which every text of the data must keep."""
        lengths = [
            len(t) for part in PARTS for raw in getattr(ds, part).inputs for t in cls.texts(raw)
        ]
        longest = max(lengths, default=0)
        limit = cfg.max_text_chars or max(DEFAULT_TEXT_CHARS, longest)
        over = sum(n > limit for n in lengths)
        if over:
            raise DataError(
                f"{over} of {len(lengths)} texts of the data are longer than --max-text-chars "
                f"{limit} (the longest has {longest} characters): raise it, or pass 0 for the "
                "data's longest"
            )
        return dataclasses.replace(cfg, max_text_chars=limit)

    def __init__(self, run: Setup, device: torch.device, log=print):
        super().__init__(run, device, log)
        fast = text_tokenizer(run.tokenizer.backend_tokenizer.to_str(), run.config["preprocessing"])
        self.contract = contract = tasks.create(run.config, fast)
        self.check_inputs()
        self.rows = {"train": self._rows("train")}
        log(
            f"windows: {len(self.rows['train'])} train (max_length "
            f"{contract.pre['max_length']}, stride {contract.pre.get('stride', 0)})"
        )
        self.loader: DataLoader | None = None

    def check_inputs(self) -> None:
        """Every input of the data as the model will be served it (a question too long for
        the windows, say), before the first epoch: one line with the counts."""
        problems: Counter = Counter()
        example: dict[str, str] = {}
        for part in PARTS:
            for raw in getattr(self.ds, part).inputs:
                try:
                    self.contract.from_holdout(raw)
                except InputError as e:
                    problems[e.reason] += 1
                    example.setdefault(e.reason, f"{part}: {e.detail}")
        if problems:
            total = sum(len(getattr(self.ds, p).inputs) for p in PARTS)
            raise DataError(
                f"{sum(problems.values())} of {total} inputs of the data cannot be read by this "
                "model: "
                + "; ".join(f"{n} {r} (e.g. {example[r]})" for r, n in problems.most_common())
            )

    def _rows(self, split: str) -> list[tuple[dict, object]]:
        part = getattr(self.ds, split)
        rows = []
        for raw, target in zip(part.inputs, part.targets, strict=True):
            for enc, y in self.contract.training_windows(raw, target):
                feeds = {
                    "input_ids": enc.ids,
                    "attention_mask": enc.attention_mask,
                    "token_type_ids": enc.type_ids,
                }
                rows.append((feeds, y))
        return rows

    def _collate(self, rows):
        return collate_windows(rows, self.contract.names(), self.contract.pad_id, self.model)

    def train_loader(self, strategy: str, dist) -> DataLoader:
        if self.loader is None:
            lengths = [len(r[0]["input_ids"]) for r in self.rows["train"]]
            batches = LengthGroupedBatches(lengths, self.cfg.batch_size, self.gen, dist)
            self.loader = DataLoader(
                self.rows["train"], batch_sampler=batches, collate_fn=self._collate
            )
        return self.loader

    def _args(self, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """A collated batch as the model's positional inputs, on the device."""
        return [x[n].to(self.device) for n in INPUT_ORDER if n in x]

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        logits = module(*self._args(x))
        return self.model.loss(logits, y.to(self.device), self.cfg.label_smoothing), len(y)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        """The loss over the labelled windows, then the task's metrics from its own reading
        of the model's outputs (entities, answers)."""
        self.model.eval()
        if split not in self.rows:
            self.rows[split] = self._rows(split)
        total, count = 0.0, 0
        for x, y in DataLoader(self.rows[split], batch_size=EVAL_BATCH, collate_fn=self._collate):
            loss = self.model.loss(self.model(*self._args(x)), y.to(self.device))
            total, count = total + loss.item() * len(y), count + len(y)
        run = torch_session(self.model, self.device)
        part = getattr(self.ds, split)
        items = [self.contract.from_holdout(v) for v in part.inputs]
        outputs = []
        for s in range(0, len(items), EVAL_BATCH):
            outputs.extend(self.contract.run(run, items[s : s + EVAL_BATCH])[0])
        metrics = self.contract.score(outputs, [self.contract.gold(t) for t in part.targets])
        return {"loss": total / max(1, count), **metrics}


class TokenClassification(SpanRecipe):
    head_type = TokenTagger


class QuestionAnswering(SpanRecipe):
    head_type = SpanExtractor

    @staticmethod
    def texts(raw: str) -> list[str]:
        pair = json.loads(raw)
        return [str(pair.get("question", "")), str(pair.get("context", ""))]

    @classmethod
    def postprocessing(cls, cfg, ds: Dataset) -> dict:
        unanswerable = ds.summary["train_per_class"].get("unanswerable", 0)
        return {"max_answer_length": cfg.max_answer_length, "allow_no_answer": unanswerable > 0}
