"""Decoding speed: tokens/s of plain and speculative decoding, acceptance, peak memory, hardware.

Decode speed excludes the prefill: our decoders time the N - 1 steps after it themselves
(``GenerationResult.decode_s``), and ``(N - 1) / decode_s`` is the decode rate; transformers'
``generate`` is timed twice, for N tokens and for 1, and gives ``(N - 1) / (t_N - t_1)``.
EOS is off so every row produces N tokens. The first run of each setting is a warm-up (CUDA
graph capture, compilation, allocator growth) and is not timed.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.decoding.speculative import PlainDecoder, SpeculativeDecoder, required_length

FALLBACK_TEXT = (
    "The history of computing is a story of ideas that outgrew the machines they were born on. "
    "Early engineers wrote programs for one computer at a time, and every new design meant new code. "
    "Compilers, operating systems and networks changed that, letting people share work across the world. "
)


@dataclass
class SpeedSettings:
    k_values: list[int] = field(default_factory=lambda: list(range(1, 9)))
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 2048, 8192])
    new_tokens: int = 128
    plain_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 3
    prompt_format: str = "chat"  # chat: one user turn + the generation prompt (how the models are used) | raw: bare text
    cuda_graphs: bool | None = None
    compile_mode: str | None = None
    kernels: str = "reference"

    def session_kwargs(self) -> dict[str, Any]:
        return {"cuda_graphs": self.cuda_graphs, "compile_mode": self.compile_mode, "kernels": self.kernels}


def hardware() -> dict[str, Any]:
    """What the numbers were measured on (recorded beside every result)."""
    info = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


PROMPT_FORMATS = ("chat", "raw")
_MARKER = "\u2063PROMPT\u2063"  # stands for the user text while the chat template is rendered


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after a user turn's text (generation prompt
    included); empty when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return [], []
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str) or rendered.count(_MARKER) != 1:
        raise ValueError("the chat template does not render a user turn's text exactly once, so a chat prompt of an exact "
                         "length cannot be built from it")
    before, after = rendered.split(_MARKER)
    return tokenizer(before, add_special_tokens=False)["input_ids"], tokenizer(after, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, texts: list[str], length: int, batch: int, vocab_size: int, seed: int = 0,
               prompt_format: str = "chat") -> torch.Tensor:
    """(batch, length) prompts: real text when a tokenizer is given (acceptance depends on it), else random ids.

    ``chat`` (when the tokenizer has a chat template): one user turn, filled with prompt text up to
    ``length`` tokens in all, then the template's generation prompt, so the model writes an answer,
    as it does in use and as the hybrids and the draft were distilled (acceptance depends on what
    is being continued). ``raw``: the prompt texts concatenated and cut mid-text. Rows start at
    different texts so a batch is not one prompt repeated.
    """
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(2, vocab_size, (batch, length), generator=g)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format {prompt_format!r} is not one of {PROMPT_FORMATS}")
    texts = texts or [FALLBACK_TEXT]
    prefix, suffix = chat_frame(tokenizer) if prompt_format == "chat" else ([], [])
    room = length - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"prompt length {length} leaves no room for text inside the chat template ({len(prefix) + len(suffix)} tokens)")
    rows = []
    for r in range(batch):
        # the texts joined into one string and tokenized once, so every boundary is tokenized as the
        # tokenizer would tokenize running text
        pieces: list[str] = []
        chars, want, i = 0, 2 * room, r
        while True:
            while chars < want:
                pieces.append(texts[i % len(texts)])
                chars += len(pieces[-1]) + 2
                i += 1
            ids = tokenizer("\n\n".join(pieces), add_special_tokens=False)["input_ids"]
            if len(ids) >= room:
                break
            want *= 2
        rows.append(prefix + ids[:room] + suffix)
    return torch.tensor(rows, dtype=torch.long)


def distinct_fraction(result) -> float:
    """Distinct tokens ÷ tokens in the first row's continuation: near 0 when decoding fell into a loop,
    which a draft predicts easily (high acceptance that would not hold on real answers)."""
    row = result.rows()[0]
    return len(set(row)) / len(row) if row else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory count for one measurement. A captured decoder holds its graph's body,
    which refers back to the decoder: earlier decoders are freed only by the cycle collector, and
    until then their buffers would count in this measurement's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def decode_rate(run: Callable[[int], Any], new_tokens: int, device: torch.device, repeats: int) -> tuple[float, Any]:
    """Decode tokens/s per row of ``run(n)``, prefill excluded, and the last result.

    Our decoders time their own decoding (``GenerationResult.decode_s``, from the end of the
    prefill): (N - 1) / best decode_s. Other generators (transformers' ``generate``) are timed
    whole: (N - 1) / (best t_N - best t_1), the best of each duration taken separately so that
    one slow outlier cannot produce a near-zero difference and an absurd rate.
    """
    warm = run(new_tokens)  # warm-up: graphs, compilation, allocator
    if getattr(warm, "decode_s", None) is not None:
        best, result = float("inf"), warm
        for _ in range(max(1, repeats)):
            result = run(new_tokens)
            best = min(best, result.decode_s)
        return (new_tokens - 1) / max(best, 1e-9), result
    best_one, best_full, result = float("inf"), float("inf"), None
    for _ in range(max(1, repeats)):
        for n in (1, new_tokens):
            _sync(device)
            start = time.perf_counter()
            out = run(n)
            _sync(device)
            elapsed = time.perf_counter() - start
            if n == 1:
                best_one = min(best_one, elapsed)
            else:
                best_full, result = min(best_full, elapsed), out
    return (new_tokens - 1) / max(best_full - best_one, 1e-9), result


def measure_plain(model, ids: torch.Tensor, settings: SpeedSettings) -> dict[str, float]:
    device = next(model.parameters()).device
    batch, length = ids.shape
    decoder = PlainDecoder(model, batch, required_length(length, settings.new_tokens), **settings.session_kwargs())
    ids = ids.to(device)
    _reset_peak_memory(device)
    rate, result = decode_rate(lambda n: decoder.generate(ids, max_new_tokens=n), settings.new_tokens, device, settings.repeats)
    if int(result.num_tokens.min()) != settings.new_tokens:  # EOS is off: a shorter row means the loop stopped early
        raise RuntimeError(f"plain decoding produced {result.num_tokens.tolist()} tokens, not {settings.new_tokens} a row: "
                           "the rate would count tokens that were never made")
    return {"tokens_per_s": rate * batch, "tokens_per_s_per_row": rate, "peak_memory_mb": _peak_memory_mb(device),
            "distinct_token_fraction": distinct_fraction(result)}


def measure_speculative(target, draft, ids: torch.Tensor, k: int, settings: SpeedSettings) -> dict[str, float]:
    device = next(target.parameters()).device
    batch, length = ids.shape
    decoder = SpeculativeDecoder(
        target, draft, k, batch, required_length(length, settings.new_tokens, k), **settings.session_kwargs()
    )
    ids = ids.to(device)
    _reset_peak_memory(device)
    rate, result = decode_rate(lambda n: decoder.generate(ids, max_new_tokens=n), settings.new_tokens, device, settings.repeats)
    stats = result.stats
    return {
        "tokens_per_s": rate * batch,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
        "peak_memory_mb": _peak_memory_mb(device),
        "distinct_token_fraction": distinct_fraction(result),
    }


def speed_table(target, draft, settings: SpeedSettings, tokenizer=None, texts: list[str] | None = None, log=print) -> dict[str, Any]:
    """Plain (every batch size) and speculative (batch 1, every K) decoding at every prompt length.

    Each measurement is guarded: a failure (e.g. out of memory at a long prompt) is recorded
    as an error string and the table goes on.
    """
    vocab = target.config.vocab_size
    results: dict[str, Any] = {"plain": {}, "speculative": {}, "errors": {}}
    for length in settings.prompt_lengths:
        for batch in settings.plain_batch_sizes:
            key = f"b{batch}_p{length}"
            try:
                ids = prompt_ids(tokenizer, texts or [], length, batch, vocab, prompt_format=settings.prompt_format)
                results["plain"][key] = measure_plain(target, ids, settings)
                log(f"plain {key}: {results['plain'][key]['tokens_per_s']:.1f} tok/s")
            except Exception as exc:  # noqa: BLE001 — one failed setting must not hide the others
                results["errors"][f"plain_{key}"] = f"{type(exc).__name__}: {exc}"
                log(f"plain {key}: FAILED {exc}")
        if draft is None:
            continue
        ids = prompt_ids(tokenizer, texts or [], length, 1, vocab, prompt_format=settings.prompt_format)
        for k in settings.k_values:
            key = f"k{k}_p{length}"
            try:
                row = measure_speculative(target, draft, ids, k, settings)
                plain = results["plain"].get(f"b1_p{length}")
                if plain:
                    row["speedup_vs_plain"] = row["tokens_per_s"] / plain["tokens_per_s"]
                results["speculative"][key] = row
                log(f"speculative {key}: {row['tokens_per_s']:.1f} tok/s, acceptance {row['acceptance_rate']:.2f}, "
                    f"mean accepted length {row['mean_accepted_length']:.2f}")
            except Exception as exc:  # noqa: BLE001
                results["errors"][f"speculative_{key}"] = f"{type(exc).__name__}: {exc}"
                log(f"speculative {key}: FAILED {exc}")
    return results


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The few numbers a report shows: plain batch-1 rate at the shortest prompt, best speculative rate and its K."""
    out: dict[str, float] = {}
    plain_b1 = sorted((int(key.split("_p")[1]), row) for key, row in results["plain"].items() if key.startswith("b1_"))
    if plain_b1:
        out["tokens_per_second"] = plain_b1[0][1]["tokens_per_s"]
    spec = results["speculative"]
    if spec:
        shortest = min(int(key.split("_p")[1]) for key in spec)
        rows = {int(key[1:].split("_")[0]): row for key, row in spec.items() if key.endswith(f"_p{shortest}")}
        best_k = max(rows, key=lambda k: rows[k]["tokens_per_s"])
        out.update(
            speculative_tokens_per_second=rows[best_k]["tokens_per_s"],
            best_k=best_k,
            acceptance_rate_at_best_k=rows[best_k]["acceptance_rate"],
        )
    return out


def plot(results: dict[str, Any], title: str, path) -> None:
    """Speculative tokens/s and acceptance against K per prompt length, plain batch-1 rates as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = sorted({int(key.split("_p")[1]) for key in list(results["speculative"]) + list(results["plain"])})
    for i, length in enumerate(lengths):
        color = f"C{i}"
        rows = sorted((int(key[1:].split("_")[0]), row) for key, row in results["speculative"].items() if key.endswith(f"_p{length}"))
        if rows:
            ks = [k for k, _ in rows]
            ax_rate.plot(ks, [r["tokens_per_s"] for _, r in rows], "o-", color=color, label=f"speculative, prompt {length}")
            ax_acc.plot(ks, [r["acceptance_rate"] for _, r in rows], "o-", color=color, label=f"prompt {length}")
        plain = results["plain"].get(f"b1_p{length}")
        if plain:
            ax_rate.axhline(plain["tokens_per_s"], color=color, ls="--", label=f"plain, prompt {length}")
    ax_rate.set(xlabel="K (draft tokens per round)", ylabel="tokens/s (batch 1)", title=title)
    ax_acc.set(xlabel="K", ylabel="acceptance rate", ylim=(0, 1.05), title="draft acceptance")
    for ax in (ax_rate, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
