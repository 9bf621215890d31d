"""The export pipeline: checkpoint → ONNX → optimized → parity → variants → reference → card.

    export_checkpoint("runs/flowers", "artifacts", int8=True)

Work happens in a hidden sibling folder renamed into place at the end, so a failure leaves no
half-written version behind; an existing version is never overwritten.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tasks
from export import card as card_mod
from export import convert, cost, quantize
from export.errors import CheckpointInvalid, ExportError, VariantError, VersionExists
from export.parity import check_parity
from export.preprocess import Feeder, input_names
from export.provenance import card_head, stamp
from export.reference import build_reference


def _sanitize(name: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return name or "model"


class Steps:
    """The export's named steps: a tqdm bar on a terminal; otherwise (logs, CI, a pipe) one
    plain line per step, as training prints its progress."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.done, self.t0 = names, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(names), desc="export", unit="step", leave=False)

    def __call__(self) -> None:
        """Start the next step."""
        name = self.names[self.done]
        if self.bar is not None:
            self.bar.set_description(f"export: {name}", refresh=False)
            self.bar.update(self.done - self.bar.n)  # the steps finished so far
            self.bar.refresh()
        else:
            print(
                f"export: {name} ({self.done + 1}/{len(self.names)}), "
                f"{time.perf_counter() - self.t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def around(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` with the bar cleared while it writes and drawn again after, so messages
        do not land on the bar's line."""
        if self.bar is None:
            return log

        def write(message: str) -> None:
            with self.bar.external_write_mode():
                log(message)

        return write


def next_version(folder: Path, also_taken: list[str] = ()) -> str:
    """v<N+1> above every v<N> in `folder` (written, or claimed by an export at work) and in
    `also_taken` (the model store's versions)."""
    names = [p.name for p in folder.glob("v*")] + list(also_taken)
    names += [p.name[1 : -len(CLAIM)] for p in folder.glob(f".v*{CLAIM}")]
    taken = [int(m.group(1)) for n in names if (m := re.fullmatch(r"v(\d+)", n))]
    return f"v{max(taken, default=0) + 1}"


CLAIM = ".claim"  # .<version>.claim: an export is writing that version


def claim_version(base: Path, name: str, opts: ExportOptions) -> tuple[str, Path]:
    """(version, claim file): the version this export writes, claimed by creating its claim
    file exclusively, so that exports started together never pick the same one."""
    base.mkdir(parents=True, exist_ok=True)
    while True:
        version = _new_version(base, name, opts)
        claim = base / f".{version}{CLAIM}"
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return version, claim
        except FileExistsError:
            if opts.version is not None:
                raise VersionExists(
                    f"another export is writing '{base / version}'; versions are never overwritten"
                ) from None


def _session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])


@dataclass(frozen=True)
class ExportOptions:
    """What `python -m export` asks for; the CLI flags mirror the fields."""

    name: str | None = None  # artifact name; None: the run folder's name
    version: str | None = None  # None: the next v<N> free in the folder and the model store
    int8: bool = False  # also an int8 variant for CPUs, written only if it passes the gate
    fp16: bool = False  # also an fp16 variant for GPUs (needs CUDA)
    opset: int = convert.DEFAULT_OPSET
    tolerance: float = 1e-4  # parity: the largest |ONNX - PyTorch| output difference allowed
    max_accuracy_drop: float = 0.01  # a variant's allowed drop of the task metric (95% bound)
    register: bool = True  # also register in the BentoML model store as <name>:<version>
    skip_existing: bool = False  # reuse the latest version when it holds this checkpoint


@dataclass
class _Source:
    """The checkpoint being exported, loaded once: its model, tokenizer and weights' sha256."""

    ckpt: object
    model: object
    tokenizer: object
    sha256: str


def _load_source(run: Path) -> _Source:
    from finetune import checkpoint as ckpt_mod
    from finetune.errors import FinetuneError

    try:
        ckpt = ckpt_mod.load_checkpoint(run)
        model = ckpt_mod.build_model(ckpt)
        tokenizer = ckpt_mod.load_tokenizer(ckpt) if tasks.uses_tokenizer(ckpt.task) else None
    except FinetuneError as e:
        raise CheckpointInvalid(str(e), getattr(e, "path", None)) from e
    if ckpt.config.get("status") != "complete":
        raise CheckpointInvalid(
            f"checkpoint '{run}' has not finished training "
            f"(status {ckpt.config.get('status')!r}); resume it first"
        )
    sha = card_mod.sha256_file(run / ckpt_mod.weights_file(ckpt.config))
    return _Source(ckpt, model, tokenizer, sha)


def _reuse(base: Path, name: str, source: _Source, opts: ExportOptions, log) -> Path | None:
    """--skip-existing: the latest version when it was exported from this checkpoint (and
    registered in a fresh model store), else None."""
    if not (opts.skip_existing and opts.version is None and base.is_dir()):
        return None
    latest = base / f"v{int(next_version(base)[1:]) - 1}"
    try:
        same = card_mod.load_card(latest)["training"].get("weights_sha256") == source.sha256
    except ExportError:
        same = False
    if not same:
        return None
    log(f"'{latest}' was exported from this checkpoint already; nothing to do")
    if opts.register:  # a fresh BentoML store (another BENTOML_HOME) still gets the model
        from export.store import register as store_register
        from export.store import tag_exists

        if not tag_exists(f"{name}:{latest.name}"):
            tag = store_register(latest, name, latest.name, card_mod.load_card(latest))
            log(f"registered in the BentoML model store as {tag}")
    return latest


def _new_version(base: Path, name: str, opts: ExportOptions) -> str:
    """The version to write: as asked, or the next one; refused when it exists anywhere."""
    version = opts.version
    if version is None:
        from export.store import stored_versions

        version = next_version(base, stored_versions(name) if opts.register else [])
    if not card_mod.TAG_PART.match(version):
        raise ExportError(
            f"version '{version}' must be lowercase letters, digits, '.', '_' or "
            f"'-', starting and ending with a letter or digit"
        )
    final = base / version
    if final.exists():
        raise VersionExists(
            f"artifact '{final}' already exists; versions are never overwritten "
            f"(leave out --version to get the next one)"
        )
    if opts.register:
        from export.store import tag_exists

        if tag_exists(f"{name}:{version}"):
            raise VersionExists(f"model store already holds '{name}:{version}'")
    return version


def export_checkpoint(
    run: str | Path,
    out: str | Path = "artifacts",
    options: ExportOptions | None = None,
    log: Callable[[str], None] = print,
    **overrides,
) -> Path:
    """Export the checkpoint at `run` to `out/<name>/<version>/`; returns that folder.
    `options` (or its fields as keywords: `int8=True`) says what to write."""
    opts = dataclasses.replace(options or ExportOptions(), **overrides)
    run = Path(run)
    source = _load_source(run)
    name = _sanitize(opts.name or run.resolve().name)
    base = Path(out) / name
    reused = _reuse(base, name, source, opts, log)
    if reused is not None:
        return reused
    if opts.fp16:
        quantize.require_cuda()
    version, claim = claim_version(base, name, opts)
    final = base / version
    work = base / f".{version}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        card = _build(source, _Target(work, name, version), opts, log)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        claim.unlink(missing_ok=True)
    if opts.register:
        from export.store import register as store_register

        tag = store_register(final, name, version, card)
        log(f"registered in the BentoML model store as {tag}")
    return final


@dataclass(frozen=True)
class _Target:
    """Where an export writes: the work folder, and the name and version it becomes."""

    work: Path
    name: str
    version: str


def _torch_graph(source: _Source, feeder, work: Path, opts: ExportOptions, stage, log):
    """torch.onnx.export, ONNX Runtime's optimisation, then parity against PyTorch:
    (model file, export details, its session, parity report)."""
    ckpt, opset, tolerance = source.ckpt, opts.opset, opts.tolerance
    graph = convert.graph_for(source.model, ckpt.task)
    stage()
    raw = work / "raw.onnx"
    t0 = time.perf_counter()
    details = convert.to_onnx(graph, feeder.feeds(feeder.take(2)), ckpt.task, raw, opset)
    stage()
    path = work / card_mod.MODEL
    details["graph_optimization"] = convert.optimize(raw, path)
    raw.unlink()
    details["seconds"] = round(time.perf_counter() - t0, 2)
    if "fallback_reason" in details:
        log(f"dynamo exporter failed ({details['fallback_reason']}); used the TorchScript one")
    stage()
    fp32 = _session(path)  # parity, then the holdout outputs: one load of the file
    return path, details, fp32, check_parity(graph, fp32, feeder, tolerance=tolerance)


def _variant(precision: str, base: quantize.Baseline, rejected: list, log) -> dict | None:
    """The first method of `precision` that passes the paired gate (export/gate.py), its file
    written and its card entry returned; every method that failed goes into `rejected`."""
    file = base.work / card_mod.VARIANT_FILES[precision]
    metric = base.feeder.contract.metric
    if precision == "int8":
        prepared = quantize.prepare(base.path, base.work)
        tries = [(m, ["CPUExecutionProvider"]) for m in quantize.methods(base.feeder)]
    else:
        prepared = None
        tries = [(quantize.FP16, quantize.cuda_providers())]

    def reject(method: quantize.Method, reason: str, **gate) -> None:
        rejected.append({"precision": precision, "method": method.name, "reason": reason, **gate})
        log(f"{precision} ({method.name}) not written: {reason}")

    try:
        for method, providers in tries:
            try:
                scores, verdict = quantize.trial(
                    method, prepared or base.path, file, base, providers
                )
            except VariantError:
                raise
            except Exception as e:  # a converter bug must not cost the fp32 artifact
                file.unlink(missing_ok=True)
                reject(
                    method, f"conversion failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                )
                continue
            value = scores[f"holdout_{metric}"]
            if not verdict.passed:
                file.unlink()
                reject(method, verdict.reason(metric), gate=verdict.to_dict())
                continue
            log(
                f"{precision} variant ({method.name}): holdout {metric.replace('_', ' ')} "
                f"{value:.4f} (fp32 {base.value:.4f}), 95% upper bound of the drop "
                f"{verdict.drop_upper_95:.4f}, agreement {scores['agreement_with_fp32']:.4f}"
            )
            return {
                "precision": precision,
                "file": file.name,
                "method": method.name,
                "validated_on": providers[0],
                **scores,
                f"{metric}_drop": base.value - value,
                "gate": verdict.to_dict(),
                "sha256": card_mod.sha256_file(file),
            }
        return None
    finally:
        if prepared is not None:
            prepared.unlink(missing_ok=True)


def _convert(source: _Source, feeder, work: Path, opts: ExportOptions, stage, log):
    """The fp32 graph, checked for parity: (path, details, session, parity report)."""
    from finetune import checkpoint as ckpt_mod

    if ckpt_mod.is_trees(source.ckpt.config):  # scikit-learn trees: skl2onnx, not torch.onnx
        from export import tabular

        return tabular.convert_and_check(
            source.model, feeder, work, opts.opset, opts.tolerance, stage
        )
    return _torch_graph(source, feeder, work, opts, stage, log)


def _build(source: _Source, target: _Target, opts: ExportOptions, log) -> dict:
    """Every file of the artifact in `target.work`; returns its card."""
    from finetune import checkpoint as ckpt_mod

    ckpt, work = source.ckpt, target.work
    if tasks.generates(ckpt.task):  # two graphs and a decoding loop (export/generate.py)
        from export import generate

        return generate.build(source, target, opts, Steps(generate.STEPS), log)
    precisions = ("int8",) * opts.int8 + ("fp16",) * opts.fp16
    stage = Steps(
        ["build", "export", "optimize", "parity", *precisions, "cost", "reference", "card"]
    )
    log = stage.around(log)
    # On a terminal the bar is cleared also when a step fails, so the CLI's error line
    # starts a line of its own.
    try:
        stage()
        feeder = Feeder(ckpt, source.tokenizer)
        path, details, fp32, parity = _convert(source, feeder, work, opts, stage, log)
        log(
            f"parity: max abs diff {parity.max_abs_diff:.2e} (tolerance {opts.tolerance:g}), "
            f"top-1 agreement {parity.top1_agreement:.4f}, {parity.checks} checks"
        )
        outputs, embeddings, stats = quantize.predict(fp32, feeder)
        metric = feeder.contract.metric  # the task's own metric gates the variants
        fp32_metrics = feeder.contract.score(outputs, feeder.targets)
        base = quantize.Baseline(
            path, work, feeder, outputs, fp32_metrics[metric], opts.max_accuracy_drop
        )
        variants, rejected = [], []
        for precision in precisions:
            stage()
            entry = _variant(precision, base, rejected, log)
            if entry is not None:
                variants.append(entry)

        stage()
        files = {"fp32": path, **{v["precision"]: work / v["file"] for v in variants}}
        files.pop("fp16", None)  # a GPU variant: its CPU time would say nothing
        price = cost.measure(files, feeder)
        log(cost.describe(price))

        stage()
        prior = ckpt.config["data"].get("train_per_class", {})
        reference = build_reference(outputs, embeddings, stats, feeder, prior)
        ckpt_mod.write_json(work / card_mod.REFERENCE, reference)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(work / card_mod.TOKENIZER)

        stage()
        card = _card(source, target, path, details, feeder)
        card |= {
            "parity": parity.to_dict(),
            "holdout": {
                "size": len(feeder),
                "metric": metric,
                **{f"fp32_{k}": v for k, v in fp32_metrics.items()},
            },
            "files": {**card["files"], "support": card_mod.support_files(work)},
            "variants": variants,
            "rejected_variants": rejected,
            "max_accuracy_drop": opts.max_accuracy_drop,
            "cost": price,
            "reference": card_mod.REFERENCE,
        }
        card_mod.write_card(work, card)
        return card
    finally:
        stage.close()


def _card(source: _Source, target: _Target, path: Path, details: dict, feeder) -> dict:
    """card.json's description of the model (the checks' fields are added by _build); the
    model file's metadata is set here too."""
    ckpt = source.ckpt
    inputs, output_sig = convert.io_signature(path)
    weights = stamp(path, source, target)
    return {
        **card_head(source, target, details),
        "inputs": inputs,
        "input_names": input_names(ckpt.task, ckpt.config["preprocessing"]),
        "outputs": output_sig,
        "postprocessing": feeder.contract.post,
        "files": {
            "model": {
                "file": path.name,
                "precision": "fp32",
                "sha256": card_mod.sha256_file(path),
                "weights_sha256": weights,
            },
        },
    }


__all__ = ["ExportOptions", "export_checkpoint", "next_version", "VariantError"]
