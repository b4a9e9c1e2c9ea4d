"""Plain and speculative generation for the hybrids (and Llama-family teachers), batch > 1 included.

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), as used by "The Mamba in the
Llama": each round the draft proposes K tokens one by one, the target scores
``[last token, d_1 … d_K]`` in one block, and a prefix of the drafts is accepted:

* greedy: ``d_i`` is accepted while it equals the target's argmax, and the target's argmax after
  the accepted prefix is appended, so the output equals the target's own greedy decoding token
  for token (lossless);
* sampling: ``d_i ~ q_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first
  rejection a token is drawn from ``norm(max(0, p_i − q_i))``; after K acceptances a bonus token is
  drawn from ``p_{K+1}``. Every emitted token then follows the target's (warped) distribution.

Rows accept different numbers of tokens. Both models run on a static cache with a length per
row (:mod:`pipeline.decoding.static_cache`), so "rolling back" a row is committing only its
kept tokens: attention forgets the rejected slots through the length mask, Mamba layers replay
only the accepted steps. The draft is rolled back by a snapshot taken after its first block,
and next round re-reads the accepted drafts together with the new token as one block (cheap,
and it leaves the draft with exactly the target's context).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.decoding.graphs import DecodeSession
from pipeline.errors import PipelineError


# --- sampling ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from logits; the same warping applies to target and draft."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise PipelineError(f"temperature {self.temperature} must be > 0 when sampling", fix="use e.g. 0.7 or 1.0")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise PipelineError(f"top_p {self.top_p} must lie in (0, 1] and top_k {self.top_k} be >= 0")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution (float32) over the last dim: temperature, then top-k, then top-p."""
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of logits (b, V)."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=generator).squeeze(-1)


GREEDY = Sampling()


# --- per-row seeds ----------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
# multipliers below 2**31, so a product with a 32-bit value stays inside int64 on every device
_MIX_A, _MIX_B = 0x21F0AAAD, 0x735A2D97


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply, a bijection on [0, 2**32)): Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _MASK32
    return x ^ (x >> 15)


def row_seed(*parts: int) -> int:
    """One 32-bit seed from integers (e.g. run seed, prompt index, answer index); any sign or size."""
    h = 0x243F6A88
    for part in parts:
        h = _mix32(h ^ _mix32(int(part) & _MASK32))
    return h


def seeded_uniform(seeds: torch.Tensor, step: int, width: int | None = None, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 uniforms in (0, 1), a pure function of (seed of the row, step, column).

    ``width``: columns ``0 … width-1`` of every row, (b, width); or ``columns`` (b, k): those of each
    row (the same column gives the same number either way). Counter-based: no generator state,
    so a row's draws do not depend on which other rows share its batch, on the batch size or on
    the device; integer arithmetic, so CPU and GPU agree bit for bit.
    """
    seeds = seeds.to(torch.long) & _MASK32
    base = _mix32(_mix32(seeds) ^ _mix32((step + 1) & _MASK32))  # (b,)
    if columns is None:
        columns = torch.arange(width, device=seeds.device)[None, :]
    bits = _mix32((base[:, None] + columns) & _MASK32)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def seeded_choice(probs: torch.Tensor, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """A token per row drawn from ``probs`` (b, V) with the row's own seed: ``argmax p / E``, E ~ Exp(1).

    The exponential race picks index i with probability p_i, like ``multinomial``, but with
    noise that belongs to the row (see :func:`seeded_uniform`).
    """
    exp = -torch.log(seeded_uniform(seeds, step, width=probs.shape[-1]))
    return (probs.float() / exp).argmax(-1)


def seeded_top_k_choice(logits: torch.Tensor, sampling: Sampling, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """:func:`seeded_choice` of ``sampling.probs(logits)`` for ``top_k > 0``, touching only the top k columns.

    Top-p is applied within the k best tokens and the noise drawn for their token ids only, so
    the token is the same as the full computation's (with float logits that tie at the k-th value,
    this keeps exactly k of them where the full mask keeps every tie) at a fraction of its cost
    (no sort and no noise over the whole vocabulary).
    """
    values, ids = logits.float().topk(min(sampling.top_k, logits.shape[-1]), dim=-1)  # descending
    values = values / sampling.temperature
    if sampling.top_p < 1:
        probs = values.softmax(-1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, float("-inf"))
    exp = -torch.log(seeded_uniform(seeds, step, columns=ids))
    return ids.gather(-1, (values.softmax(-1) / exp).argmax(-1, keepdim=True)).squeeze(-1)


# --- results ---------------------------------------------------------------------------------------


@dataclass
class SpeculativeStats:
    """Counts over (row, round) pairs of rows still generating."""

    rounds: int = 0  # target verification calls
    row_rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification (accepted drafts + the target's own token)."""
        return (self.accepted + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
        }


@dataclass
class GenerationResult:
    """New tokens only: ``tokens[r, :num_tokens[r]]`` (EOS included), ``pad_token_id`` after."""

    tokens: torch.Tensor
    num_tokens: torch.Tensor
    stats: SpeculativeStats | None = None
    decode_s: float | None = None  # wall seconds from the end of the prefill to the last token

    def rows(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.num_tokens.tolist())]


class _DecodeClock:
    """Times the decoding after the prefill, the device synchronised at both ends.

    Decode speed is the time per new token, prefill excluded. Subtracting a prefill-only run's
    time from a full run's instead left the prefill's jitter in a difference of ~50 ms, and
    rates moved by several percent from one run to the next.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def stamp(self, result: GenerationResult) -> GenerationResult:
        result.decode_s = self._now() - self.start
        return result


# --- checks -----------------------------------------------------------------------------------------


def _id_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def check_draft(target, draft, k: int, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse, before any work, a draft that cannot propose tokens the target understands."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PipelineError(f"speculative K = {k!r} must be an integer >= 1", where="k / speed.k", fix="use K in 1..8")
    sizes = {}
    for name, model in (("target", target), ("draft", draft)):
        head = model.get_output_embeddings()
        sizes[name] = (model.config.vocab_size, head.out_features if head is not None else None)
    if sizes["target"] != sizes["draft"]:
        raise PipelineError(
            f"the draft's vocabulary (config size, head rows) {sizes['draft']} differs from the target's {sizes['target']}",
            fix="use a draft built from the target's teacher (same tokenizer and embeddings)",
        )
    for attr in ("eos_token_id", "bos_token_id"):
        t_ids, d_ids = _id_set(getattr(target.config, attr, None)), _id_set(getattr(draft.config, attr, None))
        if t_ids and d_ids and t_ids != d_ids:
            raise PipelineError(f"the draft's {attr} {sorted(d_ids)} differs from the target's {sorted(t_ids)}: another tokenizer")
    if (target_tokenizer is None) != (draft_tokenizer is None):
        raise PipelineError("pass both tokenizers or neither", fix="give target_tokenizer and draft_tokenizer")
    if target_tokenizer is not None:
        t_vocab, d_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if t_vocab != d_vocab or target_tokenizer.eos_token != draft_tokenizer.eos_token:
            differing = sorted(set(t_vocab.items()) ^ set(d_vocab.items()))[:3]
            raise PipelineError(
                f"the draft's tokenizer differs from the target's (e.g. {differing})",
                fix="use a draft that shares the target's tokenizer",
            )
    t_dev, d_dev = next(target.parameters()).device, next(draft.parameters()).device
    if t_dev != d_dev:
        raise PipelineError(f"target on {t_dev} but draft on {d_dev}", fix="move both models to one device")


def prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's real tokens (left or right padding removed)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise PipelineError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return list(input_ids)
    return [row[mask.bool()] for row, mask in zip(input_ids, attention_mask)]


def _check_lengths(rows, max_new_tokens: int, session: DecodeSession, margin: int) -> None:
    if max_new_tokens < 1:
        raise PipelineError(f"max_new_tokens = {max_new_tokens} must be >= 1")
    need = max(len(r) for r in rows) + max_new_tokens + margin
    if need > session.max_length:
        raise PipelineError(f"prompts + max_new_tokens need {need} slots; the session has {session.max_length}")


def required_length(max_prompt: int, max_new_tokens: int, k: int = 0) -> int:
    """Slots a session needs: prompt, new tokens, and one block past the last commit."""
    return max_prompt + max_new_tokens + 2 * (k + 1) + 1


# --- plain decoding -------------------------------------------------------------------------------


class PlainDecoder:
    """Token-by-token decoding on a static cache (CUDA graph of the one-token step on GPU)."""

    def __init__(self, model, batch_size: int, max_length: int, **session_kwargs):
        self.session = DecodeSession(model, batch_size, max_length, max_block=1, **session_kwargs)
        self._loop = None  # (key, graph, static tensors, record, check) of the graphed greedy loop

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id=None,
        pad_token_id: int = 0,
        sampling: Sampling = GREEDY,
        generator: torch.Generator | None = None,
        sync_every: int = 16,
        row_seeds: torch.Tensor | list[int] | None = None,
        suppress_tokens: list[int] | None = None,
    ) -> GenerationResult:
        """Finished rows stop moving (commit 0) but stay in the batch; the host checks every ``sync_every`` steps.

        Greedy decoding runs :meth:`_greedy_graphed`; the loop below is the sampling path. When
        sampling, ``row_seeds`` (one integer per row) gives every row its own random stream
        (:func:`seeded_choice`) instead of ``generator``'s, so a row's tokens do not depend on the
        rest of the batch; ``suppress_tokens`` are never sampled.
        """
        session = self.session
        rows = prompt_rows(input_ids, attention_mask)
        _check_lengths(rows, max_new_tokens, session, margin=2)
        device = session.device
        eos = torch.tensor(sorted(_id_set(eos_token_id)) or [-1], device=device)
        if suppress_tokens is not None and not sampling.do_sample:
            raise PipelineError("suppress_tokens applies to sampling only", fix="sample (do_sample) or drop suppress_tokens")
        if row_seeds is not None:
            row_seeds = torch.as_tensor(row_seeds, dtype=torch.long, device=device)
            if row_seeds.shape != (len(rows),):
                raise PipelineError(f"row_seeds has shape {tuple(row_seeds.shape)}; want one seed per row ({len(rows)})")
        suppressed = None
        if suppress_tokens:
            vocab = session.model.config.vocab_size
            suppressed = torch.zeros(vocab, dtype=torch.bool, device=device)
            suppressed[torch.tensor(sorted({int(t) for t in suppress_tokens if 0 <= int(t) < vocab}), dtype=torch.long,
                                    device=device)] = True

        def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
            if suppressed is not None:
                logits = logits.masked_fill(suppressed[: logits.shape[-1]], float("-inf"))
            if row_seeds is None or not sampling.do_sample:
                return sampling.choose(logits, generator)
            if sampling.top_k:
                return seeded_top_k_choice(logits, sampling, row_seeds, step)
            return seeded_choice(sampling.probs(logits), row_seeds, step)

        token = choose(session.prefill(rows), 0)
        clock = _DecodeClock(device)
        if not sampling.do_sample:
            return clock.stamp(self._greedy_graphed(token, eos, max_new_tokens, pad_token_id, sync_every))
        tokens = torch.full((len(rows), max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        counts = torch.zeros(len(rows), dtype=torch.long, device=device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            live = ~finished
            tokens[:, step] = torch.where(live, token, pad_token_id)
            counts += live
            finished |= torch.isin(token, eos)
            if step + 1 == max_new_tokens or ((step + 1) % sync_every == 0 and bool(finished.all())):
                break
            logits = session.extend(token[:, None])[:, -1]
            session.commit((~finished).long())
            token = choose(logits, step + 1)
        return clock.stamp(GenerationResult(tokens, counts))

    def _greedy_graphed(self, token, eos, max_new_tokens, pad_token_id, sync_every):
        """Greedy decoding with the per-token bookkeeping inside the graph: the host only replays.

        The same steps as the sampling loop (extend, commit, choose, record, mark finished rows);
        on a GPU a token costs one graph launch and no host-side tensor ops, which at batch 1 are
        otherwise as slow as the model step itself; with fused kernels the bookkeeping after the
        step is one kernel too. Without CUDA graphs the body runs eagerly, so CPU tests check
        exactly this code.
        The graph and its tensors are kept for the next call with the same EOS and pad.
        """
        key = (tuple(eos.tolist()), pad_token_id)
        if self._loop is None or self._loop[0] != key:
            graph, state, record = self._capture_loop(token, eos, pad_token_id)
            # its pinned flags are allocated once (in every call they cost ~80 us of the decoding time, H100)
            self._loop = (key, graph, state, record, _LaggedCheck(state["finished"], self.session.use_graphs))
        _, graph, state, record, done = self._loop
        state["token"].copy_(token)
        state["tokens"].fill_(pad_token_id)
        for name in ("counts", "finished", "column"):
            state[name].zero_()
        record()  # the prefill's token; each replay records the token it chooses
        done.restart()
        sync_every = sync_every if self.session.use_graphs else 1  # eager: checking costs nothing, steps do
        for step in range(max_new_tokens - 1):
            graph.replay()
            if (step + 1) % sync_every == 0 and done():
                break
        return GenerationResult(state["tokens"][:, :max_new_tokens].clone(), state["counts"].clone())

    def _capture_loop(self, token, eos, pad_token_id):
        session, b = self.session, token.shape[0]
        device = session.device
        state = {
            "token": token.clone(),
            # as wide as any call's output can be (the session's length bounds prompt + new tokens)
            "tokens": torch.full((b, session.max_length), pad_token_id, dtype=torch.long, device=device),
            "counts": torch.zeros(b, dtype=torch.long, device=device),
            "finished": torch.zeros(b, dtype=torch.bool, device=device),
            "column": torch.zeros(b, 1, dtype=torch.long, device=device),  # where each row records (all equal)
        }
        token, tokens, counts, finished, column = state.values()
        fused_advance = None
        if session.kernels == "fused":
            # Triton: imported only when asked for
            from pipeline.ops.fused_decode import argmax_scratch, greedy_advance as fused_advance

            scratch = argmax_scratch(b, session.model.lm_head.weight.shape[0], device)  # the logits' width

        def record():
            live = ~finished
            tokens.scatter_(1, column, torch.where(live, token, pad_token_id)[:, None])
            counts.add_(live.long())
            finished.logical_or_((token[:, None] == eos[None, :]).any(-1))

        def advance(logits):
            """Commit the step for live rows, choose its argmax and record it (one kernel when fused)."""
            if fused_advance is not None:
                cache = session.cache
                fused_advance(logits, cache.lengths, cache.replay, token, column, tokens, counts, finished, eos,
                              pad_token_id, scratch)
                return
            session.cache.commit((~finished).long())
            token.copy_(logits.argmax(-1))
            column.add_(1)
            record()

        def body():
            advance(session.step(token[:, None])[:, -1])

        return session.capture(body, list(state.values())), state, record


class _LaggedCheck:
    """``finished.all()`` for a loop of graph replays, read one check late on a GPU.

    Reading the flag at once would drain the GPU's queue at every check: the host waits for the
    last step, and the GPU then idles until the next replay is launched. Instead each call queues a
    copy of the flag into pinned memory and answers with the copy queued at the call before, by
    which time the GPU has run the steps between the two and still has the latest ones queued. A
    loop therefore stops up to one check interval later than it could; the extra steps run on
    finished rows only, which commit nothing and record the pad, so the result is the same.
    Eagerly (no graphs) the flag is read at once.
    """

    def __init__(self, finished: torch.Tensor, lagged: bool):
        self.finished, self.lagged = finished, lagged
        # two slots: one being written by the device, one the host has read (its event waited on)
        cuda = finished.device.type == "cuda"
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.calls = 0

    def restart(self) -> None:
        """Forget earlier checks (a new decoding call): the next call answers False without waiting."""
        self.calls = 0

    def __call__(self) -> bool:
        if not self.lagged:
            return bool(self.finished.all())
        slot, self.calls = self.calls % 2, self.calls + 1
        self.flags[slot].copy_(self.finished.all(), non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        if self.calls == 1:
            return False
        if self.events[1 - slot] is not None:
            self.events[1 - slot].synchronize()
        return bool(self.flags[1 - slot])


# --- speculative decoding -------------------------------------------------------------------------


@dataclass
class _Rows:
    """Host-side bookkeeping: what each row has emitted and whether it is done."""

    max_new_tokens: int
    eos: set[int]
    out: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)

    def emit(self, r: int, new_tokens: list[int]) -> None:
        for tok in new_tokens:
            self.out[r].append(tok)
            if tok in self.eos or len(self.out[r]) >= self.max_new_tokens:
                self.done[r] = True
                return


class SpeculativeDecoder:
    """A target and a draft, each on its own static session, verifying K drafts per round."""

    def __init__(
        self,
        target,
        draft,
        k: int,
        batch_size: int,
        max_length: int,
        *,
        target_tokenizer=None,
        draft_tokenizer=None,
        **session_kwargs,
    ):
        check_draft(target, draft, k, target_tokenizer, draft_tokenizer)
        self.k = k
        self.target = DecodeSession(target, batch_size, max_length, max_block=k + 1, **session_kwargs)
        self.draft = DecodeSession(draft, batch_size, max_length, max_block=k + 1, **session_kwargs)
        # Greedy decoding runs whole rounds on the device (one graph launch per round on a GPU);
        # False takes the host loop, the sampling path's, instead (kept for comparison and tests).
        self.device_rounds = True
        self._rounds = None  # (key, graph, static tensors) of the greedy round

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id=None,
        pad_token_id: int = 0,
        sampling: Sampling = GREEDY,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        k, target, draft = self.k, self.target, self.draft
        rows = prompt_rows(input_ids, attention_mask)
        _check_lengths(rows, max_new_tokens, target, margin=2 * (k + 1))
        b, device = len(rows), target.device
        book = _Rows(max_new_tokens, _id_set(eos_token_id), [[] for _ in rows], [False] * b)
        stats = SpeculativeStats()

        last = sampling.choose(target.prefill(rows), generator)  # the target's first token
        draft.prefill(rows)
        clock = _DecodeClock(device)
        if not sampling.do_sample and self.device_rounds:
            return clock.stamp(self._greedy_rounds(last, max_new_tokens, eos_token_id, pad_token_id))
        for r, tok in enumerate(last.tolist()):
            book.emit(r, [tok])
        pending, pending_len = last[:, None], torch.ones(b, dtype=torch.long, device=device)
        slots = torch.arange(k + 1, device=device)
        while not all(book.done):
            active = torch.tensor([not d for d in book.done], device=device)
            drafts, draft_probs = self._propose(pending, pending_len, active, sampling, generator)
            target_logits = target.extend(torch.cat([last[:, None], drafts], dim=1))
            accepted, nxt = _accept(target_logits, drafts, draft_probs, sampling, generator)
            target.commit(torch.where(active, accepted + 1, 0))

            accepted_h, drafts_h, nxt_h = accepted.tolist(), drafts.tolist(), nxt.tolist()
            stats.rounds += 1
            for r in range(b):
                if book.done[r]:
                    continue
                stats.row_rounds += 1
                stats.drafted += k
                stats.accepted += accepted_h[r]
                book.emit(r, drafts_h[r][: accepted_h[r]] + [nxt_h[r]])
            padded = torch.cat([drafts, nxt[:, None]], dim=1)
            pending = torch.where(slots < accepted[:, None], padded, nxt[:, None])
            pending_len, last = accepted + 1, nxt

        tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long)
        for r, out in enumerate(book.out):
            tokens[r, : len(out)] = torch.tensor(out, dtype=torch.long)
        counts = torch.tensor([len(out) for out in book.out])
        return clock.stamp(GenerationResult(tokens.to(device), counts.to(device), stats))

    # --- greedy: whole rounds on the device ----------------------------------------------------------
    def _greedy_rounds(self, last, max_new_tokens, eos_token_id, pad_token_id, sync_every: int = 4) -> GenerationResult:
        """Greedy rounds with all bookkeeping on the device: one graph launch per round on a GPU.

        A round is what the sampling loop does — the draft catches up on the pending tokens and
        proposes K, the target verifies them, both commit — plus emitting the accepted tokens
        into an output buffer, cut at EOS or ``max_new_tokens``, so the host never reads a token.
        It checks whether every row is done only every ``sync_every`` rounds. Without CUDA graphs
        the same body runs eagerly (the CPU tests check this code). The round and its tensors are
        kept for the next call with the same EOS ids (the length limit is a tensor of the round).
        """
        key = tuple(sorted(_id_set(eos_token_id))) or (-1,)
        if self._rounds is None or self._rounds[0] != key:
            self._rounds = (key, *self._capture_rounds(last, key))
        _, graph, state = self._rounds
        eos = torch.tensor(key, device=last.device)
        state["max_new"].fill_(max_new_tokens)
        state["last"].copy_(last)
        state["pending"].zero_()
        state["pending"][:, 0] = last
        state["pending_len"].fill_(1)
        state["out"].zero_()
        state["out"][:, 0] = last
        state["count"].fill_(1)
        state["done"].copy_((last[:, None] == eos[None, :]).any(-1) | (max_new_tokens <= 1))
        for name in ("rounds", "row_rounds", "accepted"):
            state[name].zero_()
        sync_every = sync_every if self.target.use_graphs else 1  # eager: checking costs nothing, rounds do
        while not bool(state["done"].all()):
            for _ in range(sync_every):
                graph.replay()
        count = state["count"].clamp(max=max_new_tokens)
        slots = torch.arange(max_new_tokens, device=last.device)
        tokens = torch.where(slots[None, :] < count[:, None], state["out"][:, :max_new_tokens], pad_token_id)
        row_rounds, accepted = int(state["row_rounds"].sum()), int(state["accepted"].sum())
        stats = SpeculativeStats(rounds=int(state["rounds"]), row_rounds=row_rounds, drafted=row_rounds * self.k,
                                 accepted=accepted)
        return GenerationResult(tokens, count, stats)

    def _capture_rounds(self, last, eos_ids):
        k, target, draft = self.k, self.target, self.draft
        b, device = last.shape[0], last.device
        eos = torch.tensor(eos_ids, device=device)
        slots = torch.arange(k + 1, device=device)
        state = {
            "last": last.clone(), "pending": torch.zeros(b, k + 1, dtype=torch.long, device=device),
            "pending_len": torch.ones(b, dtype=torch.long, device=device),
            # as wide as any call's output can be (the session bounds prompt + new tokens), plus a round
            "out": torch.zeros(b, target.max_length + k + 1, dtype=torch.long, device=device),
            "max_new": torch.zeros((), dtype=torch.long, device=device),
            "count": torch.ones(b, dtype=torch.long, device=device), "done": torch.zeros(b, dtype=torch.bool, device=device),
            "rounds": torch.zeros((), dtype=torch.long, device=device),
            "row_rounds": torch.zeros(b, dtype=torch.long, device=device),
            "accepted": torch.zeros(b, dtype=torch.long, device=device),
        }
        st = state
        draft.snapshot()  # allocate the snapshot slot outside the capture

        def body():
            active = ~st["done"]
            drafts, _ = self._draft_proposals(st["pending"], st["pending_len"], active, draft.step, _greedy_choice)
            # the target verifies; it keeps the accepted drafts and its own next token
            target_logits = target.step(torch.cat([st["last"][:, None], drafts], dim=1))
            accepted, nxt = _accept(target_logits, drafts, None, GREEDY, None)
            target.cache.commit(torch.where(active, accepted + 1, 0))
            # emit accepted drafts + the next token, cut after an EOS and at max_new_tokens
            emitted = torch.where(slots < accepted[:, None], torch.cat([drafts, nxt[:, None]], dim=1), nxt[:, None])
            is_eos = (emitted[..., None] == eos).any(-1) & (slots <= accepted[:, None])
            n_emit = torch.minimum(accepted + 1, torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, k + 1))
            n_emit = torch.where(active, torch.minimum(n_emit, st["max_new"] - st["count"]), 0)
            st["out"].scatter_(1, st["count"][:, None] + slots, emitted)  # past count + n_emit: overwritten later
            st["rounds"].add_(active.any().long())
            st["row_rounds"].add_(active.long())
            st["accepted"].add_(torch.where(active, accepted, 0))
            st["done"].logical_or_(active & ((is_eos & (slots < n_emit[:, None])).any(1) | (st["count"] + n_emit >= st["max_new"])))
            st["count"].add_(n_emit)
            st["pending"].copy_(torch.where(slots < accepted[:, None], torch.cat([drafts, nxt[:, None]], dim=1), nxt[:, None]))
            st["pending_len"].copy_(accepted + 1)
            st["last"].copy_(nxt)

        graph = target.capture(body, list(state.values()), also=[draft])
        return graph, state

    def _propose(self, pending, pending_len, active, sampling, generator):
        """K draft tokens (b, K) and, when sampling, their distributions (b, K, V) (greedy: None)."""
        if not sampling.do_sample:
            drafts, _ = self._draft_proposals(pending, pending_len, active, self.draft.extend, _greedy_choice)
            return drafts, None

        def sample(logits):
            q = sampling.probs(logits)
            return torch.multinomial(q, 1, generator=generator).squeeze(-1), q

        drafts, probs = self._draft_proposals(pending, pending_len, active, self.draft.extend, sample)
        return drafts, torch.stack(probs, dim=1)

    def _draft_proposals(self, pending, pending_len, active, run, choose):
        """K draft tokens (b, K), and beside each what ``choose`` returned with it (its distribution when sampling).

        The draft first reads the pending tokens (the accepted drafts and the new token of the
        last round, ``pending_len[r]`` of them, padded to a block of K + 1), then proposes one
        token per step (``choose``: logits (b, V) → (token, extra)); afterwards it returns to the
        state after the pending tokens, since the target decides what stays. ``run`` is the
        draft's block step: ``extend`` (through its own graphs) in the sampling loop, ``step``
        inside a captured greedy round.
        """
        draft, k = self.draft, self.k
        logits = run(torch.nn.functional.pad(pending, (0, k + 1 - pending.shape[1])))
        logits = logits.gather(1, (pending_len - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        draft.commit(torch.where(active, pending_len, 0))
        draft.snapshot()
        tokens, extras = [], []
        for i in range(k):
            token, extra = choose(logits)
            tokens.append(token)
            extras.append(extra)
            if i + 1 < k:
                logits = run(token[:, None])[:, 0]
                draft.commit(torch.ones_like(pending_len))
        draft.restore()
        return torch.stack(tokens, dim=1), extras


def _greedy_choice(logits):
    """A draft's greedy proposal for :meth:`SpeculativeDecoder._draft_proposals`: its argmax, nothing beside."""
    return logits.argmax(-1), None


def _accept(target_logits, drafts, draft_probs, sampling: Sampling, generator):
    """(accepted count (b,), next token (b,)) from target logits (b, K+1, V) and drafts (b, K)."""
    k = drafts.shape[1]
    if not sampling.do_sample:
        best = target_logits.argmax(-1)
        accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)
        return accepted, best.gather(1, accepted[:, None]).squeeze(1)
    p = sampling.probs(target_logits)  # (b, K+1, V)
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
    accepted = (u * q_d < p_d).long().cumprod(1).sum(1)
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    q_padded = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)  # no draft after K: residual = p
    p_at = p.gather(1, at)[:, 0]
    residual = (p_at - q_padded.gather(1, at)[:, 0]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


# --- one-call helpers -------------------------------------------------------------------------------


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, **kwargs) -> GenerationResult:
    """Plain decoding with a session sized for this call (see :class:`PlainDecoder.generate`)."""
    session_kwargs = {key: kwargs.pop(key) for key in ("cuda_graphs", "compile_mode", "kernels") if key in kwargs}
    rows = prompt_rows(input_ids, attention_mask)
    length = required_length(max(len(r) for r in rows), max_new_tokens)
    decoder = PlainDecoder(model, len(rows), length, **session_kwargs)
    return decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)


def speculative_generate(
    target, draft, input_ids, attention_mask=None, *, k: int, max_new_tokens: int,
    target_tokenizer=None, draft_tokenizer=None, **kwargs,
) -> GenerationResult:
    """Speculative decoding with sessions sized for this call (see :class:`SpeculativeDecoder.generate`)."""
    check_draft(target, draft, k, target_tokenizer, draft_tokenizer)
    session_kwargs = {key: kwargs.pop(key) for key in ("cuda_graphs", "compile_mode", "kernels") if key in kwargs}
    rows = prompt_rows(input_ids, attention_mask)
    length = required_length(max(len(r) for r in rows), max_new_tokens, k)
    decoder = SpeculativeDecoder(
        target, draft, k, len(rows), length,
        target_tokenizer=target_tokenizer, draft_tokenizer=draft_tokenizer, **session_kwargs,
    )
    return decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
