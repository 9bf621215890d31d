"""Hostile requests against the task contracts, the short path and the batching path
in-process (issue 27): each case here reached a 500, a panic or unbounded memory before.
The live servers of every task take the same bodies in their own modules."""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest

import tasks
from service.batching import Batcher
from service.fastpath import FastPredict
from service.guard import replay
from tasks.audio import read_audio
from tasks.common import Prepared, check_text, text_tokenizer
from tasks.errors import InputError
from tests.test_batching import StandIn, _run

NESTED = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"


def test_nested_json_goes_to_the_route_not_to_a_500():
    """json.loads raises RecursionError (not a ValueError) past Python's stack: the short path
    must hand the body to the route, whose parser (pydantic's) refuses it with a 400."""
    handed = []

    async def route(scope, receive, send):
        handed.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-type", b"application/json")],
    }
    fast = FastPredict(route, service=lambda: object())
    asyncio.run(fast(scope, replay(NESTED, None), send))
    assert handed == [NESTED] and sent[0]["status"] == 400


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff then"])
def test_a_lone_surrogate_is_a_400_naming_it(text):
    with pytest.raises(InputError, match="lone surrogate") as e:
        check_text(text, 100)
    assert e.value.status == 400 and e.value.reason == "bad_text"


def _table_task():
    spec = {
        "task": "tabular-classification",
        "labels": ["no", "yes"],
        "preprocessing": {
            "features": [
                {"name": "age", "kind": "numeric"},
                {"name": "city", "kind": "categorical", "categories": ["a", "b"]},
            ]
        },
    }
    return tasks.create(spec)


@pytest.mark.parametrize(
    "value",
    [10**400, float("inf"), -float("inf"), "1e400", "Infinity", True, [1]],
    ids=["400-digits", "inf", "-inf", "str-1e400", "str-Infinity", "bool", "list"],
)
def test_table_values_that_are_no_finite_number_are_400(value):
    task = _table_task()
    with pytest.raises(InputError, match="column 'age'") as e:
        task.decode({"age": value, "city": "a"})
    assert e.value.status == 400


def test_table_values_as_json_parses_them():
    """The bodies as clients send them: a 400-digit integer, 1e400 and Infinity."""
    task = _table_task()
    for raw in ("1" * 400, "1e400", "Infinity"):
        row = json.loads('{"age": ' + raw + ', "city": "a"}')
        with pytest.raises(InputError, match="not a finite number"):
            task.decode(row)
    assert task.decode({"age": "41", "city": 7}).value[0] == 41.0
    assert np.isnan(task.decode({"age": None, "city": "a"}).value[0])


def _flac(rate: int, channels: int, seconds: float) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(rate * seconds), channels), np.float32), rate, format="FLAC")
    return buf.getvalue()


def test_audio_is_bounded_by_what_it_decodes_to_before_decoding():
    """5.9 s of silence at 655 kHz x 8 channels: 32 KB of FLAC, 124 MB of float samples."""
    data = _flac(655_350, 8, 5.9)
    assert len(data) < 200_000
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="decodes to 30932520 samples") as e:
        read_audio(data, max_seconds=60)
    assert e.value.status == 413 and e.value.reason == "audio_too_large"
    assert time.perf_counter() - t0 < 0.5  # refused from the header, not after decoding
    assert len(read_audio(_flac(48_000, 2, 2.0), max_seconds=60)) == 32_000


@pytest.fixture(scope="module")
def qa_task(span_bert):
    pre = {"max_length": 32, "stride": 8, "input_names": ["input_ids", "attention_mask"]}
    spec = {"task": "question-answering", "labels": ["answer"], "preprocessing": pre}
    return tasks.create(spec, text_tokenizer(span_bert / "tokenizer.json", pre))


def test_a_question_too_long_for_the_windows_is_its_own_413(qa_task):
    """32 tokens, 3 special, a stride of 8: a question may have 20 tokens. The tokenizer
    panics (a BaseException) on a longer one: inside the batch it failed every request."""
    context = " ".join(["alice met bob in paris ."] * 20)
    ok = qa_task.decode({"question": " ".join(["bob"] * 20), "context": context})
    assert ok.windows and ok.cost == sum(len(w.ids) for w in ok.windows)
    for n in (21, 40):  # 40: past max_length, where counting tokens itself fails
        with pytest.raises(InputError, match="at most 20") as e:
            qa_task.decode({"question": " ".join(["bob"] * n), "context": context})
        assert e.value.status == 413 and e.value.reason == "question_too_long"


def test_a_long_text_costs_its_tokens(qa_task):
    short = qa_task.decode({"question": "who?", "context": "alice met bob ."})
    long = qa_task.decode({"question": "who?", "context": " ".join(["alice met bob ."] * 300)})
    assert long.cost > 40 * short.cost and long.nbytes > long.cost * 100


def test_the_cost_floor_is_below_the_tokenized_cost(qa_task):
    """The floor admission asks for before tokenizing (a word is at least one token) never
    exceeds the cost the windows then have, so it refuses nothing that would have passed."""
    rng = np.random.default_rng(0)
    words = ["alice", "met", "bob", "in", "paris", ".", "unknownword", "acme,inc"]
    for n in (1, 5, 80, 900):
        value = {"question": "who met bob?", "context": " ".join(rng.choice(words, n))}
        floor = qa_task.cost_floor(value)
        assert 0 < floor <= qa_task.decode(value).cost
    assert qa_task.cost_floor(3) == 0 and qa_task.cost_floor({"context": None}) == 0


class Breaks(StandIn):
    """A model that panics on one poisoned input (NaN), as the tokenizer did."""

    def run(self, items, stats):
        if any(np.isnan(getattr(i, "value", i)) for i in items):
            raise BaseException("panicked at encoding.rs: stride must be less than max_len")
        return super().run([getattr(i, "value", i) for i in items], stats)


def test_one_bad_item_fails_alone_in_a_shared_batch():
    """Five clients whose requests share batches; one sends the poisoned input: it alone gets
    a 422, the others their own answers."""
    batch = Batcher(Breaks(0.02, 0.0), 32, timeout_s=30)

    async def scenario():
        async def client(c):
            values = [float("nan")] if c == 2 else [float(c), float(c) + 0.5]
            try:
                return (await batch(values))[:, 0].tolist()
            except InputError as e:
                return e

        return await asyncio.gather(*(client(c) for c in range(5)))

    answers = _run(batch, scenario())
    assert isinstance(answers[2], InputError) and answers[2].status == 422
    assert answers[2].reason == "unprocessable_input" and "stride" in answers[2].detail
    assert [a for i, a in enumerate(answers) if i != 2] == [[c, c + 0.5] for c in (0, 1, 3, 4)]


def test_admission_prices_a_request_by_its_cost_and_refuses_at_once():
    """64 long texts, each 5,000 tokens of a model at 0.1 ms per token: 32 s of work against a
    30-s timeout. Counted in items (as before) it was 64 x 0.1 ms and ran for 30 s."""
    batch = Batcher(StandIn(0.0, 0.0001), 32, timeout_s=30)
    batch.times.add(100, 0.01)
    batch.times.add(1000, 0.1)
    items = [Prepared(1.0, cost=5000) for _ in range(64)]
    with pytest.raises(InputError, match="about 32.0 s of model work") as e:
        batch.admit(len(items), sum(i.cost for i in items))
    assert e.value.status == 413
    batch.admit(4, 4 * 5000)  # 2 s: taken
    batch.queued, batch.queued_cost = 60, 60 * 5000  # 30 s already queued
    with pytest.raises(InputError, match="the timeout is 30 s") as e:
        batch.admit(4, 4 * 5000)
    assert e.value.status == 503 and e.value.retry_after >= 1
    batch.close()


def test_admission_counts_the_bytes_inputs_hold_once_decoded():
    mib = 1 << 20
    batch = Batcher(StandIn(0.0, 0.0001), 32, timeout_s=30, max_queue_bytes=64 * mib)
    with pytest.raises(InputError, match="TUNESERVE_MAX_QUEUE_MB") as e:
        batch.admit_bytes(65 * mib)
    assert e.value.status == 413
    batch.queued_bytes = 40 * mib
    with pytest.raises(InputError, match="holds 40 MiB") as e:
        batch.admit(2, 2, nbytes=30 * mib)
    assert e.value.status == 503 and e.value.shed_reason == "queue_bytes"
    batch.admit(2, 2, nbytes=20 * mib)
    batch.close()


def _dense_task(name: str, max_output_pixels: int):
    spec = {
        "task": name,
        "labels": ["background", "cat"],
        "preprocessing": {
            "image_size": 64,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "interpolation": "bilinear",
        },
    }
    return tasks.create(spec, limits=tasks.Limits(max_output_pixels=max_output_pixels))


def test_masks_and_drawings_of_large_images_are_capped():
    """A 6000 x 4000 image: the mask and the overlay at 1 MP (aspect kept), not 24 MP."""
    from tasks.vision import read_png_base64

    seg = _dense_task("semantic-segmentation", 1_000_000)
    output = {
        "mask": np.tile(np.arange(64, dtype=np.uint8) % 2, (64, 1)),
        "size": (6000, 4000),
        "crop": np.full((64, 64, 3), 90, np.uint8),
    }
    answer = seg.postprocess(output, {"render": True})
    assert answer["mask_size"] == [1224, 816] and 1224 * 816 <= 1_000_000
    assert read_png_base64(answer["mask"]).shape == (816, 1224)
    assert read_png_base64(answer["image"]).shape == (816, 1224, 3)
    assert set(answer["class_shares"]) == {"background", "cat"}
    small = dict(output, size=(300, 200))  # under the cap: the image's own size, as before
    assert seg.postprocess(small, {})["mask_size"] == [300, 200]

    det = _dense_task("object-detection", 1_000_000)
    boxes = {
        "boxes": np.array([[8.0, 8.0, 32.0, 24.0]], np.float32),
        "scores": np.array([0.9], np.float32),
        "labels": np.array([1]),
        "size": (6000, 4000),
        "crop": output["crop"],
    }
    answer = det.postprocess(boxes, {"render": True})
    assert read_png_base64(answer["image"]).shape == (816, 1224, 3)
    assert answer["detections"][0]["box"] == [750.0, 750.0, 3000.0, 2250.0]  # image pixels


def test_the_bodies_a_worker_holds_are_bounded():
    """Admission counted items only: 4,096 requests of 20 MiB could be held at once. Here the
    guard holds one body of 600 KB while its request works; a second of 600 KB would pass the
    1-MB bound and is a 503 before its body is read; once the first is answered, it fits."""
    from service.guard import RequestGuard

    release = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(app, max_inflight_bytes=1_000_000)
    body = b"x" * 600_000

    async def request(sent: list):
        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/predict",
            "headers": [(b"content-length", str(len(body)).encode())],
        }
        read = []

        async def receive():
            read.append(1)
            return {"type": "http.request", "body": body, "more_body": False}

        await guard(scope, receive, send)
        return sent[0]["status"], len(read)

    async def scenario():
        first = asyncio.create_task(request([]))
        await asyncio.sleep(0.05)
        refused = await request([])
        release.set()
        return await first, refused, await request([])

    (ok, _), (status, reads), (again, _) = asyncio.run(scenario())
    assert (ok, status, reads, again) == (200, 503, 0, 200)
    assert guard.inflight == 0


def test_free_memory_goes_back_after_heavy_requests_only_when_idle():
    """malloc_trim runs after a request that sent 1 MiB or more, once no request is in
    flight, on the executor; light requests and requests still running trigger nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from service.memory import Trimmer

    with ThreadPoolExecutor(1) as pool:
        trim = Trimmer(pool, min_bytes=1 << 20, interval_s=0.05)
        if trim.trim is None:
            pytest.skip("no glibc malloc_trim here")
        with trim.request(100):
            pass
        with trim.request(2 << 20):
            with trim.request(100):
                pass
            time.sleep(0.1)
            assert trim.count == 0  # the heavy one is still in flight
        time.sleep(0.2)
        assert trim.count == 1
        with trim.request(100):
            pass
        time.sleep(0.1)
        assert trim.count == 1  # nothing heavy since
