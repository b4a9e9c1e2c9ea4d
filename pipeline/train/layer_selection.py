"""Which layers keep attention at a given Mamba ratio: evenly spaced (the paper) or by sensitivity.

Progressive distillation needs nested choices: a layer that became Mamba at 50% cannot get its
attention back at 75%, so each ratio chooses among the attention layers the previous ratio kept
(``candidates``).

* ``even``: the builder's evenly spaced set (:func:`attention_layers_for_ratio`, last layer always
  kept) when it lies inside the candidates, as for the paper's 32-layer teachers. Otherwise the
  same spacing rule is applied to the candidate list itself, counting back from its last entry:
  for SmolLM2's 30 layers the builder's 75% set holds layer 26, which the 50% set (odd layers)
  already turned into Mamba, so 75% keeps 29, 27, 23, 19, 15, 11, 7, 3 and 87.5% keeps 29, 23, 15, 7.
* ``sensitivity``: each teacher layer alone is replaced by its attention-initialised Mamba mixer
  and the KL to the teacher on held-out pseudo-labels is measured; layers whose loss hurts most
  keep attention. The scores are computed once, from the teacher, and carried to later ratios in
  the model directory, so the ranking (hence nesting) cannot drift between ratios.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid, num_layers_kept

log = logging.getLogger(__name__)

LAYER_CHOICES = ("even", "sensitivity")


def evenly_spaced(candidates: Sequence[int], keep: int) -> list[int]:
    """``keep`` of ``candidates`` (sorted), evenly spaced, counting back from the last one."""
    candidates = sorted(candidates)
    if keep == 0:
        return []
    step = len(candidates) / keep
    return sorted(candidates[len(candidates) - 1 - math.floor(i * step)] for i in range(keep))


def choose_attention_layers(
    num_layers: int,
    ratio: float,
    method: str,
    candidates: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
) -> list[int]:
    """Attention layers to keep at ``ratio``, a subset of ``candidates`` (default: all layers)."""
    candidates = sorted(range(num_layers) if candidates is None else candidates)
    keep = num_layers_kept(num_layers, ratio)
    if keep > len(candidates):
        raise PipelineError(
            f"ratio {ratio} keeps {keep} attention layers but the source model has only {len(candidates)}",
            fix="list ratios in increasing order; each ratio starts from the previous one's model",
        )
    if method == "even":
        paper = attention_layers_for_ratio(num_layers, ratio)
        return paper if set(paper) <= set(candidates) else evenly_spaced(candidates, keep)
    if method == "sensitivity":
        if scores is None or len(scores) != num_layers:
            raise PipelineError("sensitivity layer choice needs one score per layer")
        ranked = sorted(candidates, key=lambda i: (-scores[i], -i))  # ties: later layer keeps attention
        return sorted(ranked[:keep])
    raise PipelineError(f"layer choice {method!r} is unknown", fix=f"use one of {LAYER_CHOICES}")


@torch.no_grad()
def layer_sensitivity(teacher, batches: list[dict], mixer_type: str, seed: int = 0, temperature: float = 1.0,
                      mixer_init: str = "attention") -> list[float]:
    """Per layer: mean token KL(teacher || teacher with only that layer converted to Mamba).

    Each layer is converted as the distill stage would convert it: with ``mixer_init: attention``
    its output scale is fitted to the attention's on these same batches first, so the score is
    the cost of the conversion, not of an unfitted norm.

    Runs on the teacher's device. Only the scored positions go through the LM head (full logits of
    a batch are rows x length x vocabulary: 6 GiB for 32 x 1024 x 49k in fp32), and the teacher's
    log-probabilities there are computed once for all 30-odd one-layer hybrids.
    """
    import torch.nn.functional as F

    from pipeline.train.losses import kl_logprobs

    num_layers = teacher.config.num_hidden_layers
    device = next(teacher.parameters()).device  # each one-layer hybrid is built on the teacher's device
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]

    def scored_logprobs(model, batch) -> torch.Tensor:
        hidden = model.model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state[batch["score_mask"]]
        return F.log_softmax(model.lm_head(hidden).float() / temperature, dim=-1)

    from pipeline.train.align import capture, fit_output_scales

    targets = [scored_logprobs(teacher, b) for b in batches]
    scored = sum(len(t) for t in targets)
    samples = []
    if mixer_init == "attention":
        tokens = 0
        for b in batches:  # the fit needs a few thousand tokens, not every sensitivity batch
            samples.append(capture(teacher, b, range(num_layers), [b["input_ids"].shape[1]] * len(b["input_ids"])))
            tokens += b["input_ids"].numel()
            if tokens >= 8192:
                break
    scores = []
    for layer in range(num_layers):
        hybrid = build_hybrid(teacher, [i for i in range(num_layers) if i != layer], mixer_type, seed=seed,
                              mixer_init=mixer_init).eval()
        if samples:
            fit_output_scales(hybrid, samples, [layer])
        total = sum(float(kl_logprobs(t, scored_logprobs(hybrid, b)).sum()) for b, t in zip(batches, targets))
        scores.append(total * temperature**2 / max(scored, 1))
        log.info("layer %d: KL %.4f when converted alone", layer, scores[-1])
        del hybrid
    return scores
