"""What every recipe shares: the parts of a run its `setup` makes (`Setup`), the model's
backbone groups, device and random state, freezing by strategy, the shuffled (or sharded)
loader, the PyTorch `session_run` the task contracts score through, and config.json.

A recipe is what a task brings to the shared loop (train/loop.py): `setup` (model, data and
config.json of a run), `train_loader`, `loss`, `evaluate` and the holdout it leaves for
export. `recipes.get(task)` finds a task's.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import tasks
from finetune import checkpoint, models
from finetune.data import Dataset, describe, load_dataset
from finetune.errors import DataError
from finetune.models.choose import choose_text_backbone
from tasks.common import INPUT_ORDER

EVAL_BATCH = 64  # samples per evaluation batch


@dataclass
class Setup:
    """A run's parts before training: what `Recipe.setup` returns and the recipe is made of."""

    cfg: object  # TrainConfig with the task's defaults filled in
    ds: Dataset
    model: nn.Module
    groups: list  # the backbone's parameter groups, bottom → top
    config: dict  # config.json
    tokenizer: object = None  # text tasks: the Hugging Face tokenizer (saved in tokenizer/)
    extra: dict = field(default_factory=dict)  # what a recipe keeps for itself (image mean...)


def versions() -> dict:
    import torchvision
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def run_config(task: str, cfg, ds: Dataset, parts: dict) -> dict:
    """config.json: the fields every task has, around `parts` (backbone, head, preprocessing,
    postprocessing) that the recipe describes."""
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "task": task,
        "status": "training",
        "backbone": parts["backbone"],
        "head": parts["head"],
        "labels": ds.labels,
        "preprocessing": parts["preprocessing"],
        "postprocessing": parts.get("postprocessing", {}),
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "amp": torch.cuda.is_available() and cfg.device != "cpu",
        "versions": versions(),
        "data": ds.summary,
    }


def set_trainable(model, groups: list[list[nn.Parameter]], strategy: str, epoch: int) -> int:
    """Freeze/unfreeze for this epoch; returns how many backbone groups (from the top) train.
    `gradual`: epoch 0 trains the head, epoch k also the top k groups (ULMFiT)."""
    n = {"full": len(groups), "feature-extraction": 0}.get(strategy, min(epoch, len(groups)))
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= len(groups) - n)
    model.head.requires_grad_(True)
    model.train()
    if n == 0:
        model.backbone.eval()  # frozen: BatchNorm statistics and dropout fixed, as in the cache
        return n
    for module in model.backbone.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Trained BatchNorm keeps its pre-trained statistics (its scale and shift still
            # learn): batches of 32 estimate them poorly, and when fine-tuning starts from a
            # probe the features the head learned stay the same (Detectron2's FrozenBN).
            module.eval()
    return n


def torch_session(model, device):
    """`session_run` for the task contract: numpy feeds → the model's export outputs."""

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(feeds[n]).to(device) for n in INPUT_ORDER if n in feeds]
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            outs = model.export_outputs(*args)
        return [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in outs]

    return run


class Recipe:
    """The parts every recipe shares: model, backbone groups, device, random state."""

    cache_seconds: float | None = None
    images = False  # the image family's defaults (cosine schedule, label smoothing)
    resumable = True  # --resume continues an interrupted run
    flow = "loop"  # trained by train/run.py in the shared loop
    loss_name = "cross-entropy"  # what report/curves.png calls the loss

    def __init__(self, run: Setup, device: torch.device, log=print):
        self.model, self.groups, self.ds, self.cfg = run.model, run.groups, run.ds, run.cfg
        self.device, self.config = device, run.config
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.samplers: list = []

    @property
    def curve_scores(self) -> tuple[str, ...]:
        """The validation figures report/curves.png draws beside the loss."""
        return (f"val_{self.contract.metric}",)

    def cached(self, strategy: str) -> bool:
        return False

    def module(self, strategy: str) -> nn.Module:
        return self.model

    def set_trainable(self, strategy: str, epoch: int) -> int:
        return set_trainable(self.model, self.groups, strategy, epoch)

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.gen.set_state(state["gen"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])

    def _loader(self, data, dist, **kw) -> DataLoader:
        """Shuffled each epoch; under torchrun each process takes its shard."""
        if dist.world > 1:
            sampler = DistributedSampler(
                data, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=self.cfg.seed
            )
            self.samplers.append(sampler)
            return DataLoader(data, batch_size=self.cfg.batch_size, sampler=sampler, **kw)
        return DataLoader(
            data, batch_size=self.cfg.batch_size, shuffle=True, generator=self.gen, **kw
        )

    @staticmethod
    def save_holdout(out, ds: Dataset, cfg, config: dict) -> None:
        """Up to `holdout_size` test examples: what export gates, checks and calibrates on."""
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.holdout_for(tasks.get(ds.task).heavy_inputs), len(ds.test))
        idx = np.sort(rng.choice(len(ds.test), size=n, replace=False))
        inputs = ds.test.inputs
        held = inputs[idx] if isinstance(inputs, np.ndarray) else [inputs[i] for i in idx]
        targets = None
        if ds.test.targets is not None:
            targets = [json.dumps(ds.test.targets[i]) for i in idx]
        checkpoint.save_holdout(out, held, ds.test.labels[idx], targets)

    def draw(self, report) -> None:
        """Pictures of its own in report/ (dense tasks: predictions on validation images)."""

    def zero_shot(self) -> dict:
        """Figures of the pretrained model before training, where the task has them
        (speech recognition: WER); kept in metrics.json as `zero_shot`."""
        return {}

    def summary_lines(self, final: dict, extra: dict) -> list[str]:
        """Lines of its own in report/summary.md (markdown)."""
        return []


class EncoderRecipe(Recipe):
    """A backbone encoder with a new head (classification, entities, answers): the model
    table's backbone for the task, its inputs, and the tokenizer of text backbones."""

    head_type: type = nn.Module  # the head class put on the encoder

    @classmethod
    def prepare(cls, cfg, spec, data, log) -> tuple[object, dict]:
        """(cfg, extra) before the data is read: what decoding needs (images: ImagePrep)."""
        return cfg, {}

    @classmethod
    def loaded(cls, cfg, ds: Dataset, log):
        """cfg once the data is read (audio: the clip window)."""
        return cfg

    @classmethod
    def windows(cls, cfg) -> dict:
        """Text tasks: how texts longer than max_length are cut into windows."""
        return {}

    @classmethod
    def postprocessing(cls, cfg, ds: Dataset) -> dict:
        """The answer's parameters, stored with the weights."""
        return {}

    @classmethod
    def preprocessing(cls, run: Setup, encoder) -> dict:
        """How an input becomes the model's feeds (texts here); the task contract reads it."""
        tok = run.tokenizer
        out = {
            "max_length": run.cfg.max_length,
            "truncation": True,
            "padding": "longest",
            "tokenizer": checkpoint.TOKENIZER,
            "pooling": encoder.pooling,
            "input_names": list(tok.model_input_names),
        }
        if tok.pad_token_id is not None:  # decoders have none: their end-of-text token pads
            out |= {"pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token)}
        return out | cls.windows(run.cfg)

    @classmethod
    def setup(cls, task: str, cfg, data, log) -> Setup:
        """The data, the model and the checkpoint's config.json for `cfg` (`--backbone auto`
        on text data: chosen once the data is read)."""
        spec = models.resolve(cfg.backbone, task)
        if task not in spec.tasks:
            raise DataError(
                f"'{data}' holds {task} data but backbone '{spec.name}' is for {spec.task}"
            )
        cfg, extra = cls.prepare(cfg, spec, data, log)
        ds = load_dataset(data, cfg, extra.get("prep"))
        log(describe(ds.summary))
        chosen_by = None
        if cfg.backbone == "auto":  # text tasks: by the data and the budget, measured
            cuda = cfg.device != "cpu" and torch.cuda.is_available()
            device = torch.device("cuda" if cuda else "cpu")
            spec, chosen_by = choose_text_backbone(task, cfg, ds, device)
            cfg = dataclasses.replace(cfg, backbone=spec.name)
            log(f"backbone auto: {chosen_by}")
        if spec.max_tokens is not None and cfg.max_length > spec.max_tokens:
            raise DataError(
                f"--max-length {cfg.max_length} is over backbone '{spec.name}''s "
                f"{spec.max_tokens} tokens"
            )
        cfg = cls.loaded(cfg, ds, log)
        encoder, dim = models.build_encoder(spec, cfg.weights, extra.get("prep"))
        model = cls.head_type(encoder, dim, len(ds.labels), cfg.dropout)
        tokenizer = None
        if tasks.uses_tokenizer(task):
            pretrained = cfg.weights in ("pretrained", "random")
            tokenizer = models.load_tokenizer(
                models.hf_location(spec) if pretrained else cfg.weights
            )
        run = Setup(cfg, ds, model, models.parameter_groups(spec, encoder), {}, tokenizer, extra)
        backbone = {
            "name": spec.name,
            "family": spec.family,
            "source": spec.source,
            "weights": cfg.weights,
            "feature_dim": dim,
            "groups": list(spec.groups),
            **{
                k: getattr(spec, k) for k in ("cased", "max_tokens") if getattr(spec, k) is not None
            },
            **({"chosen_by": chosen_by} if chosen_by else {}),
            **models.saved_architecture(spec, encoder),
        }
        head = {
            "type": cls.head_type.__name__,
            "in_features": dim,
            "out_features": len(ds.labels),
            "dropout": cfg.dropout,
        }
        parts = {
            "backbone": backbone,
            "head": head,
            "preprocessing": cls.preprocessing(run, encoder),
            "postprocessing": cls.postprocessing(cfg, ds),
        }
        run.config = run_config(task, cfg, ds, parts)
        return run
