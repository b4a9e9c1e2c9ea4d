"""Training throughput and model FLOPs utilisation (MFU), as reported by the distillation stage.

MFU here follows the usual convention (PaLM, appendix B) without attention/scan FLOPs, which are
small at these sequence lengths next to the matmuls: a trained token costs 6·N FLOPs for the
student (forward, activation gradients, weight gradients; N = parameters that multiply activations,
the LM head included even when tied), plus 2·N_teacher for the teacher's forward pass when its
logits are computed online. Freezing most of the student does not lower the count: activation
gradients still flow through every layer above a trained one, and the convention stays comparable.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched on the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that multiply activations: every weight except embeddings, plus the LM head."""
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and p.dim() > 1)
    head = model.get_output_embeddings()
    if head is not None and any(head.weight is p for n, p in model.named_parameters() if "embed_tokens" in n):
        total += head.weight.numel()  # tied: counted once as the head
    return int(total)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not in :data:`PEAK_BF16_FLOPS` (or is a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def throughput(tokens: int, seconds: float, student_params: int, teacher_params: int, device: torch.device,
               num_processes: int = 1) -> dict:
    """tokens/s (all processes together) and MFU of a run that trained ``tokens`` tokens in ``seconds``."""
    rate = tokens / seconds if seconds > 0 else float("nan")
    flops_per_token = 6 * student_params + 2 * teacher_params
    peak = peak_flops(device)
    return {
        "train_seconds": seconds,
        "tokens_per_s": rate,
        "flops_per_token": flops_per_token,
        "mfu": rate * flops_per_token / (peak * num_processes) if peak else None,
        "peak_flops_per_device": peak,
        "num_processes": num_processes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
