"""Audio classification: the CTranslate2 → Hugging Face Whisper converter against the
`ctranslate2` package's own encoder, log-mel features against transformers' Whisper feature
extractor, class folders of WAV/FLAC/OGG/MP3 with their cleaning, and a tiny Whisper through
fine-tune → export (parity) → live service (JSON, upload, tritonclient OIP, 400s and 413s) →
drift. Sine-tone clips and the tiny model are made here."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from finetune.config import TrainConfig
from tests.conftest import quiet
from tests.test_hardening import _flac
from tests.test_service import _serve, _stop, drift_checks, drift_checks_scored

TONES = {"low": 220.0, "mid": 660.0, "high": 1500.0}  # Hz


def tone(freq: float, seconds: float, rate: int, rng, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = level * np.sin(2 * np.pi * freq * (1 + 0.02 * rng.standard_normal()) * t)
    return (wave + 0.01 * level * rng.standard_normal(len(t))).astype(np.float32)


def level(rng) -> float:
    """A peak level from 0.05 to 0.5 (-26 to -6 dBFS), log-uniform: clips differ in loudness."""
    return float(10 ** rng.uniform(-1.3, -0.3))


def make_clips(root, per_class: int = 60, seed: int = 0):
    """Tones of three pitches at 8, 16 and 22.05 kHz, 0.3 to 0.5 s, as WAV, FLAC and OGG."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    for label, freq in TONES.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rate = (8000, 16000, 22050)[i % 3]
            ext = (".wav", ".flac", ".ogg")[i % 3]
            wave = tone(freq, 0.3 + 0.05 * (i % 5), rate, rng, level(rng))
            sf.write(root / label / f"{i}{ext}", wave, rate)
    return root


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A tiny random Whisper saved by transformers, then converted by ctranslate2's own
    converter: (Hugging Face folder, CTranslate2 folder)."""
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tmp = tmp_path_factory.mktemp("whisper")
    cfg = WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=100,
        max_target_positions=16,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(tmp / "hf")
    TransformersConverter(str(tmp / "hf")).convert(str(tmp / "ct2"), quantization="float16")
    return tmp / "hf", tmp / "ct2"


@pytest.fixture(scope="module")
def audio_run(tiny_whisper, tmp_path_factory):
    from export.pipeline import export_checkpoint
    from finetune.train import fine_tune

    tmp = tmp_path_factory.mktemp("audio")
    data = make_clips(tmp / "tones")
    cfg = TrainConfig(
        backbone=str(tiny_whisper[1]),
        strategy="full",
        epochs=8,
        lr=3e-3,
        backbone_lr=3e-3,
        test_fraction=0.3,
    )
    result = fine_tune(data, tmp / "run", cfg, log=quiet)
    art = export_checkpoint(tmp / "run", tmp / "art", name="tones", register=False, log=quiet)
    return tmp, result, art


def test_converted_encoder_matches_ctranslate2(tiny_whisper):
    """The fused query/key/value split back, fp16 weights widened: the converted encoder's
    features equal ctranslate2's within 1e-3, on the full window and a sliced one."""
    import ctranslate2
    import torch
    from transformers import WhisperModel

    from finetune.models import resolve
    from finetune.models.whisper import build_encoder, load_state

    hf, ct2 = tiny_whisper
    config, state = load_state(ct2)
    original = WhisperModel.from_pretrained(hf).get_encoder().state_dict()
    assert config.encoder_layers == 2 and config.encoder_attention_heads == 4
    assert set(state) == set(original)
    for name, value in state.items():  # fp16 on the way: equal to fp16 precision
        assert torch.allclose(value, original[name], atol=2e-3, rtol=1e-3), name

    encoder, dim = build_encoder(resolve(str(ct2), "audio-classification"), "pretrained")
    encoder.eval()
    assert dim == 32
    ref = ctranslate2.models.Whisper(str(ct2), device="cpu", compute_type="float32")
    x = np.random.default_rng(0).standard_normal((2, 80, 200)).astype(np.float32)
    for frames in (200, 60):
        part = np.ascontiguousarray(x[:, :, :frames])
        want = np.array(ref.encode(ctranslate2.StorageView.from_array(part), to_cpu=True))
        with torch.no_grad():
            got = encoder.hidden(torch.from_numpy(part)).numpy()
        assert got.shape == want.shape == (2, frames // 2, 32)
        assert np.abs(got - want).max() < 1e-3


def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    from tasks.audio import log_mel, mel_filters, read_audio, wav_bytes

    fe = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(0)
    wave = tone(440.0, 1.3, 16000, rng)
    want = fe(wave, sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.abs(log_mel(wave, 480_000) - want).max() < 1e-4
    assert np.abs(mel_filters(80) - fe.mel_filters.T).max() < 1e-9
    # 8 kHz in → 16 kHz out, same tone and length
    back = read_audio(wav_bytes(tone(440.0, 1.0, 8000, rng), 8000), 60)
    assert len(back) == 16000
    peak = np.argmax(np.abs(np.fft.rfft(back)))
    assert abs(peak - 440) <= 15  # 1 Hz bins


def test_audio_folders_are_detected_and_cleaned(tmp_path):
    import soundfile as sf

    from finetune.data import detect_task, load_dataset

    root = make_clips(tmp_path / "clips", per_class=6)
    rng = np.random.default_rng(1)
    sf.write(root / "low" / "x.mp3", tone(220.0, 0.4, 16000, rng), 16000, format="MP3")
    (root / "low" / "broken.wav").write_bytes(b"RIFF, but not audio")
    sf.write(root / "mid" / "silent.wav", np.zeros(800, np.float32), 8000)
    sf.write(root / "high" / "long.flac", tone(1500.0, 31.0, 8000, rng), 8000)
    assert detect_task(root) == "audio-classification"
    ds = load_dataset(root, TrainConfig())
    c = ds.summary["cleaning"]
    assert (c["undecodable"], c["empty_audio"], c["over_long"]) == (1, 1, 1), c
    assert c["undecodable_files"][0].endswith("broken.wav")
    assert len(ds.train) + len(ds.val) + len(ds.test) == 19  # 18 tones + the MP3
    assert ds.summary["clip_seconds"]["max"] == pytest.approx(0.5, abs=0.01)


def test_fine_tune_and_export_with_parity(audio_run):
    tmp, result, art = audio_run
    card = json.loads((art / "card.json").read_text())
    config = json.loads((tmp / "run" / "config.json").read_text())
    assert config["preprocessing"]["clip_seconds"] == pytest.approx(0.5)
    assert [i["name"] for i in card["inputs"]] == ["input_features", "attention_mask"]
    assert card["inputs"][0]["shape"] == ["batch", 80, 50]
    assert card["parity"]["passed"] and card["parity"]["top1_agreement"] == 1.0
    best = json.loads((tmp / "run" / "metrics.json").read_text())["best"]
    assert {"val_accuracy", "val_macro_f1"} <= set(best)
    assert result["test_accuracy"] >= 0.8, result  # three pitches, a tiny random encoder


def test_live_service_json_upload_oip_and_bad_audio(audio_run, tmp_path):
    import tritonclient.http as triton

    from tasks.audio import wav_bytes

    tmp, _, art = audio_run
    rng = np.random.default_rng(5)
    clips = {label: wav_bytes(tone(f, 0.4, 16000, rng)) for label, f in TONES.items()}
    proc, url = _serve(
        art,
        tmp_path / "serve.log",
        TUNESERVE_MAX_AUDIO_SECONDS="1",
        TUNESERVE_WORKERS="1",
        TUNESERVE_DRIFT_INTERVAL_S="1",
    )
    try:
        body = {"inputs": [base64.b64encode(c).decode() for c in clips.values()], "top_k": 2}
        r = httpx.post(url + "/predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        labels = [p["label"] for p in r.json()["predictions"]]
        assert labels == list(clips), labels
        files = [("files", (f"{k}.wav", v, "audio/wav")) for k, v in clips.items()]
        r = httpx.post(url + "/predict_file", files=files, timeout=60)
        assert [p["label"] for p in r.json()["predictions"]] == labels, r.text
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        t = triton.InferInput("INPUT", [3], "BYTES")
        t.set_data_from_numpy(np.array(list(clips.values()), dtype=np.object_), binary_data=True)
        res = client.infer("tones", [t])
        assert [x.decode() for x in res.as_numpy("label")] == labels
        long = base64.b64encode(wav_bytes(tone(220.0, 2.0, 8000, rng), 8000)).decode()
        many_channels = _flac(192_000, 8, 0.9)  # 1.4 M samples; 1 s at 48 kHz stereo: 96 k
        for payload, status, error in (
            ({"inputs": ["not base64!"]}, 400, "invalid_base64"),
            ({"inputs": [base64.b64encode(b"RIFF, no audio").decode()]}, 400, "bad_audio"),
            ({"inputs": [long]}, 413, "audio_too_long"),
            ({"inputs": [base64.b64encode(many_channels).decode()]}, 413, "audio_too_large"),
            ({"inputs": [12]}, 400, "wrong_type"),
            ({"inputs": [body["inputs"][0]], "min_score": 0.5}, 400, "bad_request"),
            ({"inputs": []}, 400, "no_inputs"),
        ):
            r = httpx.post(url + "/predict", json=payload, timeout=60)
            assert r.status_code == status and r.json()["error"] == error, (payload, r.text)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert "tuneserve_input_audio_seconds_bucket" in metrics
        assert "tuneserve_input_audio_loudness_dbfs_bucket" in metrics
        assert {"feature:loudness", "input", "embedding"} <= drift_checks(art)
        assert drift_checks_scored(url, art, body["inputs"][0]) == drift_checks(art)
    finally:
        _stop(proc)


def test_drift_fires_on_quieter_audio(audio_run, tmp_path):
    """Clips 30 dB quieter than training fire `feature:loudness`; clips like the training
    data fire nothing."""
    from service.drift import Monitor
    from service.runtime import Runtime
    from tasks.audio import wav_bytes

    rt = Runtime(audio_run[2])
    ref = json.loads((audio_run[2] / "reference.json").read_text())["drift"]
    assert "feature:loudness" in ref["thresholds"] and "input" in ref["thresholds"]

    def scores(gain: float, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        freqs = list(TONES.values())
        items = [
            rt.prepare(
                wav_bytes(tone(freqs[i % 3], 0.3 + 0.05 * (i % 5), 16000, rng, gain * level(rng)))
            )
            for i in range(200)
        ]
        monitor = Monitor(ref)
        stats: dict = {}
        outputs, embedding = rt.run(items, stats)
        monitor.observe_samples(rt.contract.drift_samples(outputs, embedding, stats))
        return monitor.scores()

    same = scores(1.0, 11)
    assert same["feature:loudness"] < 1.0 and same["input"] < 1.0, same
    quiet_clips = scores(0.03, 12)
    assert quiet_clips["feature:loudness"] >= 1.0, quiet_clips


def test_bad_audio_data_stops_the_cli_with_one_line(tmp_path):
    """A class whose every clip is broken leaves one class: a one-line error naming the
    folder; a window over Whisper's 30 s is refused before any work."""
    from tests.conftest import run_main

    root = make_clips(tmp_path / "clips", per_class=3)
    for f in (root / "low").iterdir():
        f.write_bytes(b"RIFF, but not audio")
    for f in (root / "mid").iterdir():
        f.unlink()
    (root / "mid").rmdir()
    r = run_main("finetune", str(root), "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "only one class" in last and str(root) in last, last
    r = run_main("finetune", str(root), "--clip-seconds", "40")
    assert r.returncode != 0 and "clip_seconds" in r.stderr.strip().splitlines()[-1]


def test_a_long_clip_waits_as_the_model_window_with_its_whole_statistics(audio_run):
    """A 30-s clip to a model whose window is its training clips' length: the queued input
    holds the window's samples only, its duration and loudness are the whole clip's, and the
    model's answer is the one it gives the clip cut to the window by hand."""
    from service.runtime import Runtime
    from tasks.audio import SAMPLE_RATE, loudness_db, wav_bytes

    rt = Runtime(audio_run[2])
    window = rt.contract.samples
    rng = np.random.default_rng(3)
    wave = np.concatenate(
        [
            0.3 * np.sin(2 * np.pi * 440 * np.arange(window) / SAMPLE_RATE),
            0.01 * rng.standard_normal(30 * SAMPLE_RATE - window),
        ]
    ).astype(np.float32)
    long = rt.prepare(wav_bytes(wave))
    assert long.nbytes <= 4 * window + 64 < wave.nbytes / 10
    cut = rt.prepare(wav_bytes(wave[:window]))
    stats: dict = {}
    (logits, _), (cut_logits, _) = rt.run([long], stats), rt.run([cut])
    assert stats["duration"] == [pytest.approx(30.0)] and stats["truncated"] == 1
    pcm16 = np.round(wave * 32767) / 32767  # what the WAV file holds
    assert stats["loudness"][0] == pytest.approx(loudness_db(pcm16), abs=0.05)
    np.testing.assert_allclose(logits, cut_logits, atol=1e-5)
