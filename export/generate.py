"""Export of a generative checkpoint (speech recognition): the encoder and decoder graphs
(export/seq2seq.py), checked by decoding holdout clips of several lengths through both
PyTorch and ONNX Runtime at batch sizes 1 and 7 (transcripts identical, logits within the
tolerance), the holdout transcribed by the exported graphs (WER, CER and the real-time
factor on this CPU), its drift calibration (reference.json) and the card.

The card's `files.model` is the encoder graph and `files.decoder` the decoder graph (DESIGN
§0). `--int8`: both graphs with int8 MatMul weights (ONNX Runtime's dynamic quantization,
per channel), written only when the paired bootstrap of the holdout's WER rise stays within
`--max-accuracy-drop` (export/gate.py); fp16 is not offered for these yet (named in
`rejected_variants`).
"""

from __future__ import annotations

import shutil
import time

import numpy as np

from export import card as card_mod
from export import convert
from export.errors import ParityError
from export.preprocess import Feeder
from export.provenance import card_head, stamp
from export.reference import build_reference
from export.seq2seq import parity, write_graphs
from tasks.decoding import OrtGraphs

STEPS = ["build", "export", "parity", "holdout", "int8", "reference", "card"]
DECODER = "decoder.onnx"
INT8 = ("model.int8.onnx", "decoder.int8.onnx")
INT8_METHOD = "dynamic-matmul-per-channel"
PARITY_CLIPS = 7  # holdout clips decoded by both, from the shortest to the longest
HOLDOUT_BATCH = 16  # sequences decoded together on the holdout


def _parity_items(feeder: Feeder) -> list:
    """Up to PARITY_CLIPS holdout clips spread over its lengths (the longest included, so a
    clip of several windows is checked when the holdout has one)."""
    order = np.argsort([i.value.seconds for i in feeder.items])
    picks = np.unique(np.linspace(0, len(order) - 1, min(PARITY_CLIPS, len(order))).round())
    return [feeder.items[order[int(k)]] for k in picks]


def _holdout(graphs, feeder: Feeder) -> tuple[list, np.ndarray, dict, dict]:
    """(outputs, embeddings, input statistics, speed) of the whole holdout by the graphs."""
    contract = feeder.contract
    outputs, embeddings, stats = [], [], {}
    t0 = time.perf_counter()
    for s in range(0, len(feeder.items), HOLDOUT_BATCH * 4):
        part: dict = {}
        out, emb = contract.run(
            graphs, feeder.items[s : s + HOLDOUT_BATCH * 4], part, max_batch=HOLDOUT_BATCH
        )
        outputs += out
        embeddings.append(emb)
        for k, v in part.items():
            stats.setdefault(k, []).extend(v)
    wall = time.perf_counter() - t0
    audio = float(sum(i.value.seconds for i in feeder.items))
    speed = {
        "audio_seconds": round(audio, 2),
        "wall_seconds": round(wall, 2),
        "real_time_factor": round(wall / max(audio, 1e-9), 4),
        "batch": HOLDOUT_BATCH,
        "provider": "CPUExecutionProvider",
    }
    return outputs, np.concatenate(embeddings), stats, speed


def _int8(graphs, outputs, feeder: Feeder, opts, log) -> tuple[dict | None, dict | None]:
    """(the int8 variant's card entry, None), or (None, why it was not written)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.gate import judge

    files = [graphs[0].with_name(name) for name in INT8]
    for src, out in zip(graphs, files, strict=True):
        quantize_dynamic(
            str(src),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
    ours, _, _, speed = _holdout(OrtGraphs(*files), feeder)
    contract = feeder.contract
    scores = contract.score(ours, feeder.targets)
    verdict = judge(contract, outputs, ours, feeder.targets, opts.max_accuracy_drop)
    metric = contract.metric
    if not verdict.passed:
        for f in files:
            f.unlink()
        reason = verdict.reason(metric)
        log(f"int8 ({INT8_METHOD}) not written: {reason}")
        gate = verdict.to_dict()
        return None, {"precision": "int8", "method": INT8_METHOD, "reason": reason, "gate": gate}
    log(
        f"int8 variant ({INT8_METHOD}): holdout WER {scores['wer']:.4f}, 95% upper bound of "
        f"the rise {verdict.drop_upper_95:.4f}; {speed['wall_seconds']} s for the holdout"
    )
    return {
        "precision": "int8",
        "file": files[0].name,
        "decoder_file": files[1].name,
        "method": INT8_METHOD,
        "validated_on": "CPUExecutionProvider",
        **{f"holdout_{k}": v for k, v in scores.items()},
        "gate": verdict.to_dict(),
        "sha256": card_mod.sha256_file(files[0]),
        "decoder_sha256": card_mod.sha256_file(files[1]),
        "speed": speed,
    }, None


def _file_entry(path, role: str, weights_sha256: str) -> dict:
    return {
        "file": path.name,
        "role": role,
        "precision": "fp32",
        "sha256": card_mod.sha256_file(path),
        "weights_sha256": weights_sha256,
    }


def _checked_parity(model, graphs, feeder: Feeder, tolerance: float, log) -> dict:
    """The parity report; ParityError when transcripts differ or logits pass the tolerance."""
    import torch

    contract = feeder.contract
    reference = model.steps(contract.layout, torch.device("cpu"))
    report = parity(reference, graphs, contract, _parity_items(feeder))
    failures = []
    if not report["transcripts_identical"]:
        failures.append(f"transcripts differ: {report['mismatched']}")
    # Logits of a 50k-token vocabulary after a few hundred steps reach tens: the tolerance
    # is relative to their scale (float32 keeps about 7 digits of each).
    allowed = tolerance * max(1.0, report["max_abs_logit"])
    report["tolerance"] = allowed
    if report["max_abs_diff"] > allowed:
        failures.append(
            f"logits differ by {report['max_abs_diff']:.2e} > {tolerance:g} x the "
            f"largest logit {report['max_abs_logit']:.1f}"
        )
    if failures:
        raise ParityError(failures, report["max_abs_diff"], 0.0)
    log(
        f"parity: max abs logit diff {report['max_abs_diff']:.2e} over {report['steps']} "
        f"decoder steps, transcripts identical at batch sizes {report['batch_sizes']}"
    )
    return report


def _variants(graphs, outputs, feeder: Feeder, opts, log) -> tuple[list, list]:
    """(written variants, rejected ones): int8 when asked and it passes; fp16 not offered."""
    variants, rejected = [], []
    if opts.int8:
        entry, reason = _int8(graphs, outputs, feeder, opts, log)
        if entry is not None:
            variants.append(entry)
        else:
            rejected.append(reason)
    rejected += [
        {"precision": "fp16", "method": None, "reason": "not offered for generative models yet"}
    ] * opts.fp16
    return variants, rejected


def build(source, target, opts, stage, log) -> dict:
    """Every file of a generative artifact in `target.work`; returns its card."""
    ckpt, work = source.ckpt, target.work
    log = stage.around(log)
    try:
        stage()
        feeder = Feeder(ckpt)
        contract, pre = feeder.contract, ckpt.config["preprocessing"]
        stage()
        t0 = time.perf_counter()
        frames = int(round(pre["window_seconds"] * pre["sample_rate"] / pre["hop_length"]))
        enc, dec = write_graphs(
            source.model, contract.layout, work, opts.opset, int(pre["n_mels"]), frames
        )
        enc = enc.rename(work / card_mod.MODEL)
        dec = dec.rename(work / DECODER)
        details = {"exporter": "torchscript", "opset": opts.opset}
        details["seconds"] = round(time.perf_counter() - t0, 2)
        stage()
        graphs = OrtGraphs(enc, dec)
        report = _checked_parity(source.model, graphs, feeder, opts.tolerance, log)
        stage()
        outputs, embeddings, stats, speed = _holdout(graphs, feeder)
        scores = contract.score(outputs, feeder.targets)
        log(
            f"holdout: WER {scores['wer']:.4f}, CER {scores['cer']:.4f} on {scores['n']} clips; "
            f"{speed['audio_seconds']} s of audio in {speed['wall_seconds']} s on this CPU"
        )
        stage()
        variants, rejected = _variants((enc, dec), outputs, feeder, opts, log)
        stage()
        calibration = build_reference(outputs, embeddings, stats, feeder, {})
        from finetune import checkpoint as ckpt_mod

        ckpt_mod.write_json(work / card_mod.REFERENCE, calibration)
        (work / card_mod.TOKENIZER).mkdir()
        shutil.copyfile(
            ckpt.path / ckpt_mod.TOKENIZER / "tokenizer.json",
            work / card_mod.TOKENIZER / "tokenizer.json",
        )
        stage()
        card = _card(source, target, enc, dec, details)
        card |= {
            "parity": report,
            "holdout": {"size": len(feeder), "metric": contract.metric}
            | {f"fp32_{k}": v for k, v in scores.items()},
            "variants": variants,
            "rejected_variants": rejected,
            "max_accuracy_drop": opts.max_accuracy_drop,
            "cost": {"fp32": speed} | {v["precision"]: v.pop("speed") for v in variants},
            "reference": card_mod.REFERENCE,
        }
        card["files"]["support"] = card_mod.support_files(work)
        card_mod.write_card(work, card)
        return card
    finally:
        stage.close()


def _card(source, target, enc, dec, details: dict) -> dict:
    ckpt = source.ckpt
    inputs, outputs = convert.io_signature(enc)
    dec_inputs, dec_outputs = convert.io_signature(dec)
    files = {
        role: _file_entry(path, role, stamp(path, source, target))
        for role, path in (("encoder", enc), ("decoder", dec))
    }
    head = card_head(source, target, details)
    zero = ckpt.metrics.get("zero_shot") or {}
    head["training"] |= {f"zero_shot_{k}": v for k, v in zero.items() if isinstance(v, float)}
    return {
        **head,
        "inputs": inputs,
        "input_names": ["input_features"],
        "outputs": outputs,
        "decoder": {"inputs": dec_inputs, "outputs": dec_outputs},
        "postprocessing": {},
        "files": {"model": files["encoder"], "decoder": files["decoder"]},
    }
