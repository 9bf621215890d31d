"""Drift detection: the statistics against scipy, the calibrated false-alarm rate on fresh
in-distribution windows, injected shifts, the exported calibration on a real (tiny) model,
and the gauges of a running service."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import stats as sps

from service.drift import (
    CHECKS,
    WINDOW,
    Monitor,
    calibrate,
    chi_square,
    ks_distance,
    statistics,
    summarize,
)
from tests.conftest import make_images
from tests.test_service import _b64, _serve, _stop

RATE = 0.01  # target false alarms per evaluation (any check)


def test_statistics_match_scipy():
    rng = np.random.default_rng(1)
    counts = np.array([30, 50, 120])
    probs = np.array([0.2, 0.3, 0.5])
    want = sps.chisquare(counts, counts.sum() * probs).statistic
    assert chi_square(counts, probs) == pytest.approx(want)
    a, b = rng.normal(0, 1, 200), rng.normal(0.3, 1.2, 333)
    assert ks_distance(a, np.sort(b)) == pytest.approx(sps.ks_2samp(a, b).statistic)
    a = rng.integers(0, 5, 50).astype(float)  # ties
    b = rng.integers(0, 5, 70).astype(float)
    assert ks_distance(a, np.sort(b)) == pytest.approx(sps.ks_2samp(a, b).statistic)


class World:
    """A synthetic model: 3 classes, 16-d embeddings whose class means set the logits."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(0, 2, (3, 16))
        self.prior = np.array([0.5, 0.3, 0.2])

    def sample(self, n, rng, prior=None, shift=0.0, input_shift=0.0, temperature=1.0):
        y = rng.choice(3, n, p=self.prior if prior is None else prior)
        emb = self.centres[y] + rng.normal(0, 1, (n, 16)) + shift
        logits = -((emb[:, None, :] - self.centres[None]) ** 2).sum(-1) / (8 * temperature)
        inputs = rng.normal(0.5, 0.1, n) + input_shift
        return logits, emb, inputs


@pytest.fixture(scope="module")
def world():
    w = World()
    rng = np.random.default_rng(2)
    logits, emb, inputs = w.sample(800, rng)
    drift = calibrate(logits, emb, inputs, list(w.prior), RATE)
    return w, drift["basis"], drift


def _alarms(world, windows, seed, **shift) -> tuple[int, list[str]]:
    w, basis, drift = world
    rng = np.random.default_rng(seed)
    alarms, fired = 0, set()
    for _ in range(windows):
        s = summarize(*w.sample(WINDOW, rng, **shift), basis)
        scores = {c: v / drift["thresholds"][c] for c, v in statistics(s, drift).items()}
        hit = [c for c in CHECKS if scores[c] >= 1]
        alarms += bool(hit)
        fired |= set(hit)
    return alarms, sorted(fired)


def test_in_distribution_windows_rarely_alarm(world):
    # 300 fresh windows at a 1% target: P(Binomial(300, 0.01) >= 10) < 0.001.
    alarms, _ = _alarms(world, 300, seed=3)
    assert alarms < 10, f"{alarms} false alarms in 300 in-distribution windows"


@pytest.mark.parametrize(
    "shift, check",
    [
        ({"prior": np.array([0.1, 0.3, 0.6])}, "prediction"),
        ({"temperature": 4.0}, "confidence"),
        ({"shift": 1.0}, "embedding"),
        ({"input_shift": 0.05}, "input"),
    ],
    ids=["class-prior", "confidence", "embedding", "input"],
)
def test_injected_shifts_fire_within_one_window(world, shift, check):
    """Each shift is caught by its check in (almost) every window of WINDOW samples."""
    alarms, fired = _alarms(world, 20, seed=4, **shift)
    assert alarms >= 19 and check in fired, (alarms, fired)


def test_window_expires_and_a_quiet_window_is_not_rescored(world):
    """Samples older than the maximum age leave the window; with no fresh samples the same
    window is not scored again (an alert must not hold on stale data)."""
    w, basis, drift = world
    rng = np.random.default_rng(5)
    monitor = Monitor(drift, max_age_s=60)
    monitor.observe(*w.sample(WINDOW // 2, rng), now=0.0)
    monitor.observe(*w.sample(WINDOW // 2, rng), now=30.0)
    assert monitor.samples(now=31.0) == WINDOW
    assert set(monitor.scores(now=31.0)) == set(CHECKS)
    assert monitor.scores(now=40.0) is None, "re-scored a window without new samples"
    assert monitor.samples(now=61.0) == WINDOW // 2  # the first half is older than 60 s
    monitor.observe(*w.sample(10, rng), now=62.0)
    assert monitor.scores(now=62.0) is None, "scored a window below its size"
    assert monitor.samples(now=200.0) == 0


# ------------------------------------------------------------------ a real (tiny) model


def _crops(artifact) -> list[np.ndarray]:
    """Fresh images of the training distribution (another seed), as arrays."""
    files = sorted(make_images(artifact.parent / "fresh", per_class=70, seed=11).rglob("*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def test_small_holdout_disables_calibration_with_a_reason(image_artifact_dir):
    import json

    drift = json.loads((image_artifact_dir / "reference.json").read_text())["drift"]
    assert "thresholds" not in drift and "at least" in drift["disabled"]


def _png(arr: np.ndarray, edit=None) -> bytes:
    im = Image.fromarray(arr)
    im = edit(im) if edit else im
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _monitor_scores(rt, images: list[bytes]) -> dict[str, float]:
    import json

    monitor = Monitor(json.loads((rt.folder / "reference.json").read_text())["drift"])
    items = [rt.prepare(b) for b in images]
    for i in range(0, len(items), 32):
        stats: dict = {}
        logits, emb = rt.run(items[i : i + 32], stats)
        monitor.observe(logits, emb, stats["brightness"])
    return monitor.scores()


@pytest.mark.parametrize(
    "edit, check",
    [
        (None, None),
        (lambda im: Image.eval(im, lambda v: int(v * 0.45)), "input"),
        (lambda im: im.convert("L"), None),
        (lambda im: im.filter(ImageFilter.GaussianBlur(6)), None),
    ],
    ids=["in-distribution", "darker", "grayscale", "blur"],
)
def test_exported_calibration_on_the_tiny_image_model(calibrated, edit, check):
    """The export's calibration with the service's runtime: new images from the training
    distribution raise no alarm; a darker camera fires the input check; grayscale and blur
    change what the model sees (colours are its whole signal) and fire at least one check."""
    from service.runtime import Runtime

    rt = Runtime(calibrated, precision="fp32")
    arrays = _crops(calibrated)
    order = np.random.default_rng(0).permutation(len(arrays))[:WINDOW]
    images = [_png(arrays[i], edit) for i in order]
    scores = _monitor_scores(rt, images)
    assert scores is not None and set(scores) == set(CHECKS)
    if edit is None:
        assert max(scores.values()) < 1, scores
    elif check:
        assert scores[check] >= 1, scores
    else:
        assert max(scores.values()) >= 1, scores


def test_running_service_replay_stays_quiet_and_exports_gauges(calibrated, tmp_path):
    """In-distribution traffic through a running service (one worker, evaluated every second):
    6 windows of 200 fresh images. At 1% false alarms per evaluation,
    P(Binomial(6, 0.01) >= 3) < 2e-5, so at most 2 alarmed windows pass."""
    proc, url = _serve(
        calibrated, tmp_path / "svc.log", TUNESERVE_DRIFT_INTERVAL_S="1", TUNESERVE_WORKERS="1"
    )
    crops = _crops(calibrated)
    rng = np.random.default_rng(5)
    alarmed, text = 0, ""
    try:
        for _ in range(6):
            window = [_b64(_png(crops[i])) for i in rng.integers(0, len(crops), WINDOW)]
            for i in range(0, WINDOW, 50):
                r = httpx.post(url + "/predict", json={"inputs": window[i : i + 50]})
                assert r.status_code == 200
            time.sleep(1.5)  # at least one evaluation of exactly this window
            text = httpx.get(url + "/metrics").text
            detected = [
                float(ln.split()[-1])
                for ln in text.splitlines()
                if ln.startswith("tuneserve_drift_detected{")
            ]
            assert len(detected) == len(CHECKS), text[-2000:]
            alarmed += any(detected)
    finally:
        _stop(proc)
    assert alarmed <= 2, f"{alarmed} of 6 in-distribution windows raised a drift alarm"
    scores = [ln for ln in text.splitlines() if ln.startswith("tuneserve_drift_score{")]
    assert {c for c in CHECKS for ln in scores if f'check="{c}"' in ln} == set(CHECKS)
    samples = [ln for ln in text.splitlines() if ln.startswith("tuneserve_drift_window_samples{")]
    assert float(samples[0].split()[-1]) == WINDOW
    stamp = [ln for ln in text.splitlines() if ln.startswith("tuneserve_drift_last_evaluation")]
    assert time.time() - float(stamp[0].split()[-1]) < 30
