"""A decoding session over a static cache: prefill, run blocks, commit, roll back — under CUDA graphs on GPU.

``DecodeSession`` owns a model and a :class:`StaticHybridCache`. ``extend(tokens)`` runs one
block of T tokens through :func:`pipeline.decoding.step.forward_block`; on CUDA the first call
for each T captures that function in a CUDA graph (after warm-up, optionally through
``torch.compile`` so elementwise ops fuse) and later calls only copy the tokens in and replay
it. On CPU the same function runs eagerly, so the tests exercise exactly the captured code.
A plain decoder captures T = 1; a speculative target captures T = K + 1; its draft both.

Teachers run through the same code: a Llama-family model becomes an all-attention hybrid
(:func:`as_hybrid`, exact to float rounding — the hybrid with no Mamba layer *is* the teacher).
"""

from __future__ import annotations

import functools
import logging

import torch

from pipeline.decoding.fused_step import FusedStep, check_fused
from pipeline.decoding.static_cache import StaticHybridCache
from pipeline.decoding.step import KERNELS, forward_block, settle
from pipeline.errors import PipelineError
from pipeline.models.builder import build_hybrid
from pipeline.models.cache import HybridMambaCache
from pipeline.models.configuration_hybrid import HybridMambaConfig

log = logging.getLogger(__name__)

# Not "reduce-overhead": it would capture CUDA graphs of its own inside ours.
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def as_hybrid(model) -> torch.nn.Module:
    """The model itself if it is a hybrid; a Llama-family teacher as an all-attention hybrid."""
    if isinstance(getattr(model, "config", None), HybridMambaConfig):
        return model
    try:
        return build_hybrid(model, attention_layers=range(model.config.num_hidden_layers)).eval()
    except PipelineError as exc:
        raise PipelineError(
            f"cannot decode with {type(model).__name__}: {exc.what}",
            fix="use a hybrid checkpoint or a Llama-family causal LM (llama, mistral, qwen2)",
        ) from exc


class DecodeSession:
    """Static-shape decoding state of one model for ``batch_size`` rows of up to ``max_length`` tokens."""

    def __init__(
        self,
        model,
        batch_size: int,
        max_length: int,
        max_block: int = 1,
        *,
        cuda_graphs: bool | None = None,
        compile_mode: str | None = None,
        kernels: str = "reference",
    ):
        if kernels not in KERNELS:
            raise PipelineError(f"unknown Mamba kernels {kernels!r}", fix=f"use one of {KERNELS}")
        if compile_mode not in COMPILE_MODES:
            raise PipelineError(f"unknown compile mode {compile_mode!r}", fix=f"use one of {COMPILE_MODES}")
        self.model = as_hybrid(model)
        max_length = -(-max_length // 16) * 16  # aligned key length: fused SDPA kernels accept the mask
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        fused = kernels == "fused"
        if fused:
            check_fused(self.model, self.device)
            if compile_mode:
                raise PipelineError("torch.compile has nothing to fuse in the fused kernels' step", fix="leave compile_mode unset")
        self.cache = StaticHybridCache(self.model.config, batch_size, max_length, max_block, self.dtype, self.device,
                                       conv_ring=fused)
        self.batch_size, self.max_length, self.max_block = batch_size, max_length, max_block
        self.kernels = kernels
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise PipelineError("CUDA graphs need a CUDA model", fix="pass cuda_graphs=False (or None) on CPU")
        if fused:
            step = FusedStep(self.model, self.cache)
        else:
            step = functools.partial(forward_block, self.model, self.cache, kernels=kernels)
        self._step = torch.compile(step, mode=compile_mode, dynamic=False) if compile_mode else step
        self._graphs: dict[int, tuple[_CapturedGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self._saved: list[torch.Tensor] | None = None

    # --- prefill ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Run each row's prompt (1-D token tensors, any lengths) and return last-token logits (b, V).

        Rows of equal length go through the model together; the eager model's own forward does
        the prefill (chunked scans), and its cache is copied into the static buffers.
        """
        if len(rows) != self.batch_size:
            raise PipelineError(f"got {len(rows)} prompts for a session of batch size {self.batch_size}")
        logits = torch.empty(self.batch_size, self.model.config.vocab_size, device=self.device, dtype=torch.float32)
        by_length: dict[int, list[int]] = {}
        for r, row in enumerate(rows):
            if row.numel() == 0:
                raise PipelineError(f"prompt {r} is empty", fix="give every row at least one token")
            by_length.setdefault(int(row.numel()), []).append(r)
        for length, members in by_length.items():
            index = torch.tensor(members, device=self.device)
            ids = torch.stack([rows[r] for r in members]).to(self.device)
            cache = HybridMambaCache(self.model.config, len(members), self.dtype, self.device)
            out = self.model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            self.cache.load_rows(index, cache, length)
            logits[index] = out.logits[:, -1].float()
        return logits

    # --- blocks -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (b, T, V) of a block of tokens (b, T) at each row's next positions; commit afterwards.

        Under CUDA graphs the returned tensor is the graph's output buffer: read it before the
        next ``extend`` of the same T.
        """
        t = tokens.shape[1]
        if t > self.max_block:
            raise PipelineError(f"block of {t} tokens exceeds the session's max_block {self.max_block}")
        if not self.use_graphs:
            return self._step(tokens)
        if t not in self._graphs:
            self._capture(t)
        graph, static_tokens, static_logits = self._graphs[t]
        static_tokens.copy_(tokens)
        graph.replay()
        return static_logits

    def commit(self, keep: torch.Tensor) -> None:
        """Row r keeps the first ``keep[r]`` tokens of the last block (0 … T)."""
        self.cache.commit(keep.to(device=self.device, dtype=torch.long))

    def snapshot(self) -> None:
        """Remember the recurrent state (one slot); :meth:`restore` returns to it."""
        self._saved = self.cache.snapshot(into=self._saved)

    def restore(self) -> None:
        self.cache.restore(self._saved)

    @torch.inference_mode()
    def settle(self) -> None:
        """Make the cache's Mamba states the current ones (for inspection and tests)."""
        settle(self.model, self.cache)

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths

    # --- CUDA graphs ---------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The block step itself, never through a graph: for callers capturing a larger loop body."""
        if tokens.shape[1] > self.max_block:
            raise PipelineError(f"block of {tokens.shape[1]} tokens exceeds the session's max_block {self.max_block}")
        return self._step(tokens)

    def capture(self, body, state: list[torch.Tensor], also: list["DecodeSession"] = ()):
        """A CUDA graph of ``body()``, a closure over static tensors that calls :meth:`step`.

        Whatever ``body`` changes must be in the cache or in ``state``: warm-up runs (outside
        the capture) are undone on both, so capturing changes nothing; ``also`` names other
        sessions the body steps (a speculative round's draft), whose caches are restored too.
        Without CUDA graphs the returned object's ``replay()`` runs ``body`` eagerly: the same
        code on every device.

        The returned object holds ``body``: a graph replays fixed addresses, so every tensor the
        body closes over (constants made before the capture, such as an index range or the EOS
        ids) must outlive it. Held only by a closure that died with its caller, such a tensor's
        memory went back to the allocator and later eager work overwrote what the graph reads
        (on an H100: out-of-bounds scatters and wrong tokens in the captured speculative round).
        """
        if not self.use_graphs:
            return _EagerGraph(body)
        sessions = [self, *also]
        saved_caches = [session.cache.snapshot() for session in sessions]
        saved_state = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile / autotune / allocator warm-up outside the capture
                body()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        for session, saved in zip(sessions, saved_caches):
            session.cache.restore(saved)
        for dst, src in zip(state, saved_state):
            dst.copy_(src)
        return _CapturedGraph(graph, body)

    def _capture(self, t: int) -> None:
        """Capture the step for blocks of ``t`` tokens (its output buffer is the graph's logits)."""
        static_tokens = torch.zeros(self.batch_size, t, dtype=torch.long, device=self.device)
        captured = {}

        def body():
            captured["logits"] = self._step(static_tokens)  # the last call is the captured one

        graph = self.capture(body, [])
        self._graphs[t] = (graph, static_tokens, captured["logits"])
        log.info("captured a CUDA graph for blocks of %d token(s), batch %d", t, self.batch_size)


class _CapturedGraph:
    """A CUDA graph and the body it was captured from, kept together so the body's tensors live as long as the graph."""

    def __init__(self, graph: torch.cuda.CUDAGraph, body):
        self.graph, self.body = graph, body

    def replay(self) -> None:
        self.graph.replay()


class _EagerGraph:
    """Stands in for a captured graph where there are no CUDA graphs: ``replay()`` runs the body."""

    def __init__(self, body):
        self.replay = body
