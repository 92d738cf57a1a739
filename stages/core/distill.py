"""The post-pruning objective: task cross-entropy + lambda * KL(student || cached teacher).

The teacher is known only through its top-k log-probabilities and the log-mass left
outside them, so both distributions are compared on k + 1 buckets: the teacher's top-k
tokens and "everything else".  This is an exact KL between those coarsened distributions
(it is zero when the student matches the teacher on them) and costs O(k) per position on
top of the student's own softmax.  The direction is the paper's, D_KL(student || teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def distill_kl(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor, teacher_tail: torch.Tensor
) -> torch.Tensor:
    """Mean over positions of KL(student || teacher) on the teacher's top-k + tail buckets.

    student_logits (..., V); teacher_logprobs, teacher_ids (..., k); teacher_tail (...).
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = student.gather(-1, teacher_ids.long())
    s_tail = _log1mexp(torch.logsumexp(s_top, dim=-1))
    t_top, t_tail = teacher_logprobs.float(), teacher_tail.float()
    kl = (s_top.exp() * (s_top - t_top)).sum(-1) + s_tail.exp() * (s_tail - t_tail)
    return kl.mean()


def task_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; logits (B, S, V) for ids (B, S)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
