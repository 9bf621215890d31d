"""The decoding loop of the generative tasks (DESIGN.md §0), numpy only: fine-tuning's
validation, export's parity and the service run these same steps around PyTorch or ONNX
Runtime, so a transcript is the same wherever it is made.

    batch = DecodeBatch(layout, step)              # step(feeds) -> {output name: array}
    batch.add(Sequence(key, prompt, cross=...))    # joins at the next step
    while batch.active: finished = batch.step()    # one decoder call for every sequence

The decoder graph (export/seq2seq.py writes it; `Layout` names its tensors) takes, per
decoder layer, its self-attention cache `past_key_{i}` / `past_value_{i}` [B, heads, L, d]
and, for encoder-decoder models, the cross-attention keys and values the encoder graph
computed once per input (`cross_key_{i}` / `cross_value_{i}` [B, heads, S, d]); it returns
`logits` [B, T, vocab] and the caches extended by the T new positions (`present_*`).

Continuous batching: sequences of different lengths share one call. Their caches are
stacked to the longest and the shorter ones padded on the left with masked slots
(`attention_mask` [B, L + T]); positions are explicit (`position_ids` [B, T]), so padding
never moves a token. Every cache starts with one masked slot, so no tensor ever has a
zero-length axis (ONNX Runtime and the exporters handle those poorly). A sequence that
joins is first run alone on its prompt (the prefill, batched with the others joining at
that step), then merged into the running batch; one that stops leaves at once.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Layout:
    """The decoder graph's shape and the generation rules, from the card's `generation`."""

    layers: int
    heads: int
    head_dim: int
    eos_id: int
    max_positions: int  # the decoder's position embeddings: prompt + output at most
    cross: bool = True  # encoder-decoder (cross keys and values are fed)
    suppress: tuple[int, ...] = ()  # tokens never generated
    suppress_first: tuple[int, ...] = ()  # tokens not generated at the first step

    @classmethod
    def of(cls, gen: dict) -> Layout:
        return cls(
            layers=int(gen["layers"]),
            heads=int(gen["heads"]),
            head_dim=int(gen["head_dim"]),
            eos_id=int(gen["eos_id"]),
            max_positions=int(gen["max_positions"]),
            cross=bool(gen.get("cross", True)),
            suppress=tuple(gen.get("suppress", ())),
            suppress_first=tuple(gen.get("suppress_first", ())),
        )

    def names(self, kind: str) -> list[str]:
        """past / present / cross tensor names, key then value per layer."""
        return [f"{kind}_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")]


@dataclass(eq=False)
class Sequence:
    """One input being decoded: its prompt, what it generated, and its own cache rows."""

    key: object  # the caller's handle (a request and its chunk)
    prompt: list[int]
    max_new_tokens: int
    cross: list[np.ndarray] | None = None  # per cross name: [heads, S, d]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_logits: np.ndarray | None = None  # [T_prompt, vocab] of the prefill (no-speech)
    done: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class DecodeBatch:
    """Greedy decoding of many sequences, one decoder call per step for all of them."""

    def __init__(self, layout: Layout, step: Step):
        self.layout, self.run = layout, step
        self.active: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.cache: dict[str, np.ndarray] = {}  # past name → [B, heads, L, d]
        self.cross: dict[str, np.ndarray] = {}  # cross name → [B, heads, S, d]
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, L]: 1 where a slot holds a token
        self.calls = 0  # decoder calls made (prefill and steps)
        self.sizes: list[int] = []  # sequences per decoder step (the batch-size histogram)

    def add(self, seq: Sequence) -> None:
        room = self.layout.max_positions - len(seq.prompt)
        if room < 1:
            raise ValueError(
                f"a prompt of {len(seq.prompt)} tokens leaves no room in the decoder's "
                f"{self.layout.max_positions} positions"
            )
        seq.max_new_tokens = max(1, min(seq.max_new_tokens, room))
        self.waiting.append(seq)

    @property
    def pending(self) -> bool:
        return bool(self.active or self.waiting)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[Sequence]:
        """Prefill those that joined, then one token for everyone; the finished ones."""
        finished = []
        if self.waiting:
            joining, self.waiting = self.waiting, []
            finished += self._prefill(joining)
        if self.active:
            finished += self._next()
        return finished

    def _feeds(self, ids, positions, mask, cache, cross) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        feeds |= cache
        if self.layout.cross:
            feeds |= cross
        return feeds

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        lay, n = self.layout, len(seqs)
        t = max(len(s.prompt) for s in seqs)
        ids = np.zeros((n, t), dtype=np.int64)
        positions = np.zeros((n, t), dtype=np.int64)
        mask = np.zeros((n, 1 + t), dtype=np.int64)  # slot 0: the masked start slot
        for r, s in enumerate(seqs):
            k = len(s.prompt)
            ids[r, t - k :] = s.prompt  # left-padded: the last column is every prompt's last
            positions[r, t - k :] = np.arange(k)
            mask[r, 1 + t - k :] = 1
        empty = np.zeros((n, lay.heads, 1, lay.head_dim), dtype=np.float32)
        cache = {name: empty for name in lay.names("past")}
        cross = {}
        if lay.cross:
            cross = {
                name: np.stack([s.cross[j] for s in seqs])
                for j, name in enumerate(lay.names("cross"))
            }
        out = self.run(self._feeds(ids, positions, mask, cache, cross))
        self.calls += 1
        for r, s in enumerate(seqs):
            s.first_logits = out["logits"][r, t - len(s.prompt) :]
        presents = {p: out[p.replace("past", "present")] for p in lay.names("past")}
        done = self._choose(seqs, out["logits"][:, -1], first=True)
        keep = [r for r, s in enumerate(seqs) if not s.done]
        if keep:
            self._merge(
                [seqs[r] for r in keep],
                mask[keep],
                {k: v[keep] for k, v in presents.items()},
                {k: v[keep] for k, v in cross.items()},
            )
        return done

    def _next(self) -> list[Sequence]:
        n = len(self.active)
        ids = np.array([[s.tokens[-1]] for s in self.active], dtype=np.int64)
        positions = np.array([[s.length - 1] for s in self.active], dtype=np.int64)
        mask = np.concatenate([self.mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        out = self.run(self._feeds(ids, positions, mask, self.cache, self.cross))
        self.calls += 1
        self.sizes.append(n)
        self.mask = mask
        self.cache = {p: out[p.replace("past", "present")] for p in self.layout.names("past")}
        done = self._choose(self.active, out["logits"][:, -1], first=False)
        if done:
            self._drop([r for r, s in enumerate(self.active) if s.done])
        return done

    def _choose(self, seqs: Seq[Sequence], logits: np.ndarray, first: bool) -> list[Sequence]:
        """Append each sequence's next token (greedy); mark and return those that stop."""
        lay = self.layout
        logits = np.array(logits, dtype=np.float32)
        if lay.suppress:
            logits[:, list(lay.suppress)] = -np.inf
        if first and lay.suppress_first:
            logits[:, list(lay.suppress_first)] = -np.inf
        logp = log_softmax(logits)
        best = logp.argmax(axis=1)
        done = []
        for s, token, lp in zip(seqs, best, logp[np.arange(len(seqs)), best], strict=True):
            token = int(token)
            if token == lay.eos_id:
                s.done = True
            else:
                s.tokens.append(token)
                s.logprobs.append(float(lp))
                s.done = len(s.tokens) >= s.max_new_tokens
            if s.done:
                done.append(s)
        return done

    # ------------------------------------------------------------------ the running batch

    def _merge(self, seqs, mask, cache, cross) -> None:
        """Append sequences to the running batch, padding the shorter side on the left."""
        if not self.active:
            self.active, self.mask, self.cache, self.cross = list(seqs), mask, cache, cross
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)

        def pad(a: np.ndarray, axis: int, to: int) -> np.ndarray:
            extra = to - a.shape[axis]
            if extra == 0:
                return a
            widths = [(0, 0)] * a.ndim
            widths[axis] = (extra, 0)
            return np.pad(a, widths)

        self.mask = np.concatenate([pad(self.mask, 1, width), pad(mask, 1, width)])
        self.cache = {
            k: np.concatenate([pad(self.cache[k], 2, width), pad(cache[k], 2, width)])
            for k in self.cache
        }
        self.cross = {k: np.concatenate([self.cross[k], cross[k]]) for k in self.cross}
        self.active += list(seqs)

    def _drop(self, rows: list[int]) -> None:
        keep = [r for r in range(len(self.active)) if r not in set(rows)]
        self.active = [self.active[r] for r in keep]
        self.mask = self.mask[keep]
        self.cache = {k: v[keep] for k, v in self.cache.items()}
        self.cross = {k: v[keep] for k, v in self.cross.items()}
        if keep:  # slots no remaining sequence uses (left of every one's first token)
            used = np.flatnonzero(self.mask.any(axis=0))
            start = max(0, int(used[0]) - 1) if len(used) else 0  # keep one masked slot
            if start:
                self.mask = self.mask[:, start:]
                self.cache = {k: v[:, :, start:] for k, v in self.cache.items()}


def decode_all(layout: Layout, step: Step, seqs: Seq[Sequence], max_batch: int = 16) -> None:
    """Decode `seqs` to the end, at most `max_batch` at a time, a new one joining as soon as
    another stops (what the service does with requests; export and validation use it)."""
    queue = list(seqs)
    batch = DecodeBatch(layout, step)
    while queue or batch.pending:
        room = max_batch - len(batch.active) - len(batch.waiting)
        for _ in range(min(room, len(queue))):
            batch.add(queue.pop(0))
        batch.step()


class OrtGraphs:
    """The decoding loop's `encode` and `step` on ONNX Runtime sessions (dict in, dict out)."""

    def __init__(self, encoder, decoder, providers=None, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(encoder), opts, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder), opts, providers=providers)
        self.provider = self.encoder.get_providers()[0]
        self._enc_out = [o.name for o in self.encoder.get_outputs()]
        self._dec_out = [o.name for o in self.decoder.get_outputs()]
        self._dec_in = [i.name for i in self.decoder.get_inputs()]

    def encode(self, feeds: dict) -> dict:
        return dict(zip(self._enc_out, self.encoder.run(None, feeds), strict=True))

    def step(self, feeds: dict) -> dict:
        feeds = {n: feeds[n] for n in self._dec_in}
        return dict(zip(self._dec_out, self.decoder.run(None, feeds), strict=True))
