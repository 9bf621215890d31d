"""Speech recognition: Whisper fine-tuned on transcribed clips (teacher-forced cross-entropy on
the transcript's tokens), validated by word error rate from the same greedy decoding the
service runs (tasks/decoding.py around the PyTorch graphs of models/seq2seq.py).

Strategies: `feature-extraction` trains the decoder with the encoder frozen (the acoustic
model stays as pre-trained; the decoder learns the data's words and style), `full` trains
both, the encoder at `backbone_lr`; `auto` takes the decoder only below AUTO_FULL_CLIPS
training clips (a few hundred clips over-fit a whole model and its acoustic layers gain
little), and full fine-tuning above. Before the first epoch the pretrained model is scored
on validation and test (zero-shot): the report puts the fine-tuned WER beside it, and the
pretrained weights stay the checkpoint's unless an epoch's validation WER is strictly lower
(train/loop.py: the baseline is epoch 0).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import tasks
from finetune import checkpoint, models
from finetune.config import DEFAULT_BATCH
from finetune.data import Dataset, describe, load_dataset
from finetune.errors import DataError, UnsupportedBackbone
from finetune.models.seq2seq import SpeechModel, generation_spec, load_whisper, special_ids
from finetune.models.whisper import WhisperAudioEncoder, whisper_location
from finetune.progress import progress
from finetune.recipes.base import Recipe, Setup, run_config
from tasks.audio import HOP, SAMPLE_RATE

AUTO_FULL_CLIPS = 1000  # auto: full fine-tuning from this many training clips
DEFAULT_LR = 1e-5  # Whisper fine-tuning's usual rate (the Hugging Face recipes: 1e-5)
SPEECH_BATCH = 8  # 30-s windows per batch
OVERLAP_SECONDS = 5.0  # long clips: consecutive windows share this much audio
DECODE_BATCH = 16  # sequences decoded together in validation
IGNORE = -100  # label of prompt positions and padding (not scored)


def _suppression(location, whisper, tokenizer_file: Path) -> tuple[list[int], list[int]]:
    """(never generated, not generated first): the model's own lists (CTranslate2's
    config.json or Hugging Face's generation_config.json), plus the timestamp tokens, which
    a transcript without timestamps never holds."""
    import json

    folder = Path(str(location))
    suppress, first = [], []
    for name, keys in (
        ("config.json", ("suppress_ids", "suppress_ids_begin")),
        ("generation_config.json", ("suppress_tokens", "begin_suppress_tokens")),
    ):
        f = folder / name
        if f.is_file():
            c = json.loads(f.read_text())
            if keys[0] in c:
                suppress, first = list(c[keys[0]] or []), list(c.get(keys[1]) or [])
                break
    no_ts = special_ids(tokenizer_file)["<|notimestamps|>"]
    timestamps = range(no_ts + 1, whisper.config.vocab_size)
    return sorted({*suppress, *timestamps}), sorted(set(first))


def _tokenizer_file(location) -> Path:
    folder = Path(str(location))
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    try:  # a hub id: the tokenizer file of the repository
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(location), "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 (offline, missing repository or file)
        raise UnsupportedBackbone(f"Whisper model '{location}' has no tokenizer.json: {e}") from e


def sentence_case(text: str) -> tuple[str, bool]:
    """An all-capitals transcript (LibriSpeech's) in sentence case, and whether it was: the
    model would otherwise learn to shout, and the service answer in capitals."""
    letters = [c for c in text if c.isalpha()]
    if not letters or any(c.islower() for c in letters):
        return text, False
    low = text.lower()
    low = " ".join(
        "I" if w == "i" else "I'" + w[2:] if w.startswith("i'") else w for w in low.split()
    )
    return low[:1].upper() + low[1:], True


class SpeechRecognition(Recipe):
    loss_name = "cross-entropy (transcript tokens)"
    curve_scores = ("val_wer", "val_cer")

    @classmethod
    def setup(cls, task: str, cfg, data, log) -> Setup:
        spec = models.resolve(cfg.backbone, task)
        if task not in spec.tasks:
            raise DataError(
                f"'{data}' holds {task} data but backbone '{spec.name}' is for {spec.task}"
            )
        location = whisper_location(spec) if cfg.weights == "pretrained" else cfg.weights
        whisper = load_whisper(location)
        c = whisper.config
        window = c.max_source_positions * 2 * HOP / SAMPLE_RATE  # conv2 halves the frames
        cfg = dataclasses.replace(cfg, clip_seconds=window)
        ds = load_dataset(data, cfg)
        log(describe(ds.summary))
        cfg = cls._defaults(cfg, ds, log)
        tok_file = _tokenizer_file(location)
        suppress, first = _suppression(location, whisper, tok_file)
        gen = generation_spec(whisper, tok_file, suppress, first)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        model = SpeechModel(whisper)
        run = Setup(cfg, ds, model, model.groups(), {}, tokenizer, {"tokenizer_file": tok_file})
        hf_config = c.to_dict()
        hf_config.pop("_attn_implementation_autoset", None)
        parts = {
            "backbone": {
                "name": spec.name,
                "family": "whisper",
                "source": spec.source,
                "weights": cfg.weights,
                "feature_dim": int(c.d_model),
                "groups": [],
                "hf_config": hf_config,
            },
            "head": {"type": "WhisperDecoder", "layers": int(c.decoder_layers)},
            "preprocessing": {
                "sample_rate": SAMPLE_RATE,
                "n_mels": int(c.num_mel_bins),
                "hop_length": HOP,
                "window_seconds": window,
                "overlap_seconds": min(OVERLAP_SECONDS, window / 4),
                "features": "whisper log-mel (log10, floored 8 below the maximum, (x + 4) / 4)",
                "tokenizer": checkpoint.TOKENIZER,
                "generation": gen,
            },
        }
        run.config = run_config(task, cfg, ds, parts)
        return run

    @classmethod
    def _defaults(cls, cfg, ds: Dataset, log):
        """Strategy (auto: by the number of clips), rates and batch size for Whisper."""
        changes: dict = {}
        n = len(ds.train)
        if cfg.strategy == "auto":
            full = n >= AUTO_FULL_CLIPS
            changes["strategy"] = "full" if full else "feature-extraction"
            log(
                f"strategy auto: {changes['strategy']} ({n} training clips; the decoder alone "
                f"below {AUTO_FULL_CLIPS}, where the whole model over-fits)"
            )
        if cfg.strategy == "gradual":
            raise DataError("strategy 'gradual' is not offered for speech recognition")
        if cfg.lr == type(cfg).lr:  # the classifier heads' default: far too high for Whisper
            changes["lr"] = DEFAULT_LR
        if cfg.backbone_lr is None:
            changes["backbone_lr"] = changes.get("lr", cfg.lr)
        if cfg.batch_size in (None, DEFAULT_BATCH):  # the classifiers' batch: 30-s windows
            changes["batch_size"] = SPEECH_BATCH
        return dataclasses.replace(cfg, **changes)

    # ------------------------------------------------------------------ the run

    def __init__(self, run: Setup, device: torch.device, log=print):
        super().__init__(run, device, log)
        from tokenizers import Tokenizer

        self.contract = tasks.create(
            run.config, Tokenizer.from_file(str(run.extra["tokenizer_file"]))
        )
        self.tok = run.tokenizer
        self.prompt = self.contract.prompt(None)
        self.sets: dict[str, tuple] = {}
        self.clips: dict[str, list] = {}  # split -> its decoded clips (Prepared)
        self.hidden: dict[str, torch.Tensor] = {}  # split -> frozen encoder states
        self.feed_states = False
        self.sentence_cased = 0
        self.log = log

    def _clips(self, split: str) -> list:
        """A split's clips decoded once (validation is transcribed every epoch)."""
        if split not in self.clips:
            inputs = getattr(self.ds, split).inputs
            self.clips[split] = [self.contract.from_holdout(c) for c in inputs]
        return self.clips[split]

    def _examples(self, split: str):
        """(log-mel features [N, mels, frames], token rows) of a split's clips within one
        window (every train and val clip; test is decoded whole, not teacher-forced)."""
        if split not in self.sets:
            part = getattr(self.ds, split)
            items = self._clips(split)
            if split == "train":  # never transcribed: its decoded clips need not stay
                del self.clips[split]
            keep = [i for i, it in enumerate(items) if it.cost == 1]
            feats = []
            for s in progress(range(0, len(keep), 64), f"log-mel features of {split}"):
                chunk = [items[i] for i in keep[s : s + 64]]
                feats.append(self.contract.features(chunk)[0])
            rows = []
            for i in keep:
                text, cased = sentence_case(part.targets[i]["text"])
                self.sentence_cased += cased and split == "train"
                ids = self.tok(" " + text, add_special_tokens=False)["input_ids"]
                room = self.contract.layout.max_positions - len(self.prompt) - 1
                rows.append(self.prompt + ids[:room] + [self.contract.layout.eos_id])
            x = np.concatenate(feats) if feats else np.zeros((0, 1, 1), np.float32)
            self.sets[split] = (torch.from_numpy(x), rows)
        return self.sets[split]

    def _collate(self, batch):
        feats = torch.stack([b[0] for b in batch])
        t = max(len(b[1]) for b in batch) - 1
        ids = torch.full((len(batch), t), self.contract.layout.eos_id, dtype=torch.long)
        labels = torch.full((len(batch), t), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for r, (_, row) in enumerate(batch):
            n = len(row) - 1
            ids[r, :n] = torch.tensor(row[:-1])
            labels[r, :n] = torch.tensor(row[1:])
            labels[r, : len(self.prompt) - 1] = IGNORE  # the prompt is given, not learnt
            mask[r, :n] = 1
        return feats, ids, mask, labels

    def cached(self, strategy: str) -> bool:
        """The frozen encoder's states are computed once per split (decoder-only training)."""
        return strategy == "feature-extraction" and self.cfg.cache_features

    def _states(self, split: str) -> torch.Tensor:
        """The frozen encoder's hidden states of a split's clips [N, frames / 2, d], float16
        on the CPU (tiny.en: 1.1 MB per 30-s window)."""
        if split not in self.hidden:
            t0 = time.perf_counter()
            x, _ = self._examples(split)
            encoder = WhisperAudioEncoder(self.model.backbone).eval()
            parts = []
            with torch.no_grad():
                for s in progress(range(0, len(x), SPEECH_BATCH), f"encoding {split} clips"):
                    h = encoder.hidden(x[s : s + SPEECH_BATCH].to(self.device))
                    parts.append(h.to("cpu", torch.float16))
            self.hidden[split] = torch.cat(parts) if parts else torch.zeros(0)
            self.cache_seconds = (self.cache_seconds or 0.0) + time.perf_counter() - t0
        return self.hidden[split]

    def train_loader(self, strategy: str, dist) -> DataLoader:
        x, rows = self._examples("train")
        if self.sentence_cased:
            self.log(f"{self.sentence_cased} all-capitals transcripts trained in sentence case")
        self.feed_states = self.cached(strategy)
        inputs = self._states("train") if self.feed_states else x
        return self._loader(list(zip(inputs, rows, strict=True)), dist, collate_fn=self._collate)

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        feats, ids, mask, labels = (t.to(self.device) for t in batch)
        if self.feed_states:  # the encoder's cached states, not log-mel features
            logits = module(None, ids, mask, encoder_hidden_states=feats.float()).float()
        else:
            logits = module(feats, ids, mask).float()
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE)
        return loss, len(ids)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        """Teacher-forced loss (clips within one window) and WER / CER of the greedy
        transcripts of every clip of `split`, whole (long ones in windows)."""
        self.model.eval()
        out: dict = {}
        x, rows = self._examples(split)
        self.feed_states = self.cached(strategy)
        if self.feed_states:
            x = self._states(split)
        if rows:
            total, count = 0.0, 0
            for s in range(0, len(rows), SPEECH_BATCH):
                batch = self._collate(
                    list(zip(x[s : s + SPEECH_BATCH], rows[s : s + SPEECH_BATCH], strict=True))
                )
                loss, n = self.loss(self.model, batch)
                total, count = total + loss.item() * n, count + n
            out["loss"] = total / count
        out |= self.transcribe(split)
        return out

    def transcribe(self, split: str) -> dict:
        """WER and CER of the greedy transcripts of every clip of `split`, and a few of them."""
        from tasks.metrics import error_rates

        part = getattr(self.ds, split)
        graphs = self.model.steps(self.contract.layout, self.device)
        clips, hyp = self._clips(split), []
        for s in progress(range(0, len(clips), 64), f"transcribing {split}"):
            outs, _ = self.contract.run(graphs, clips[s : s + 64], max_batch=DECODE_BATCH)
            hyp += [self.contract.postprocess(o, {})["text"] for o in outs]
        refs = [t["text"] for t in part.targets]
        m = error_rates(hyp, refs)
        pairs = [{"reference": r, "transcript": h} for r, h in zip(refs[:5], hyp[:5], strict=True)]
        return {"wer": m["wer"], "cer": m["cer"], "examples": pairs}

    def zero_shot(self) -> dict:
        """The pretrained model on validation and test before any training (the report
        puts the fine-tuned figures beside these)."""
        out = {}
        for split in ("val", "test"):
            m = self.evaluate(split, "none")
            out |= {f"{split}_{k}": v for k, v in m.items() if isinstance(v, float)}
        self.log(
            f"zero-shot (pretrained, before fine-tuning): val WER {out['val_wer']:.4f}, "
            f"test WER {out['test_wer']:.4f}"
        )
        return out

    def summary_lines(self, final: dict, extra: dict) -> list[str]:
        zero = extra.get("zero_shot")
        lines = []
        if zero:
            lines += [
                "| WER (normalised, jiwer) | validation | test |",
                "|---|---:|---:|",
                f"| pretrained, zero-shot | {zero['val_wer']:.4f} | {zero['test_wer']:.4f} |",
                f"| fine-tuned | {final['val_wer']:.4f} | {final['test_wer']:.4f} |",
                "",
            ]
        lines += ["| test reference | transcript |", "|---|---|"]
        lines += [
            f"| {e['reference']} | {e['transcript']} |" for e in final.get("test_examples", [])
        ]
        return lines + [""]
