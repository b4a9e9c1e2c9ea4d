"""Distillation objectives, each returning a *sum* over scored positions.

Sums, not means: the trainer divides by the number of scored tokens of the whole optimizer step
(all micro-batches on all processes), so the gradient does not depend on how a step is split
across gradient accumulation or processes.

Temperature follows Hinton et al.: both distributions are softened by ``T`` and the KL is scaled
by ``T**2`` so gradient magnitudes stay comparable across temperatures.

Top-k approximation (``kl_topk_sum``), used when the teacher's logits come from a cache: the
teacher keeps only its ``k`` most likely tokens ``S`` (log-probs at temperature ``T``); its tail
mass is ``t = 1 - sum_S p``. Both distributions are coarsened to the ``k + 1`` outcomes
``S ∪ {tail}`` and the KL between the coarsened distributions is returned:
``sum_S p_i log(p_i / q_i) + t log(t / q_tail)``. By the data-processing inequality this is a lower
bound of the full KL, exact when the teacher puts no mass outside ``S`` or when the student's tail
has the teacher's shape; the gap shrinks as ``k`` grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-12


def kl_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Per position ``KL(teacher || student)`` from log-probabilities over the full vocabulary (last dim)."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def kl_full_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over masked positions of ``KL(teacher_T || student_T) * T**2`` on the full vocabulary."""
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return kl_logprobs(t, s).sum() * temperature**2


def kl_topk_sum(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over masked positions of the KL on the teacher's top-k support plus one tail bucket."""
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    s_top = s.gather(-1, topk_ids[mask].long())
    t_top = topk_logprobs[mask].float()
    t_tail = (1.0 - t_top.exp().sum(-1)).clamp(min=0.0)
    s_tail = (1.0 - s_top.exp().sum(-1)).clamp(min=_TINY)
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + torch.xlogy(t_tail, t_tail) - t_tail * s_tail.log()
    return kl.sum() * temperature**2


def ce_sum(student_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the next-token cross-entropy on the pseudo-label tokens."""
    targets = input_ids[:, 1:]
    logits = student_logits[:, :-1][mask[:, :-1]].float()
    return F.cross_entropy(logits, targets[mask[:, :-1]], reduction="sum")


def top1_agreement_count(student_logits: torch.Tensor, teacher_top1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (student_logits[mask].argmax(-1) == teacher_top1[mask]).sum()
