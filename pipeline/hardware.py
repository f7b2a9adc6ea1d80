"""What the hardware found here computes fast: the train stage's autocast precision and the
inference precision decide from it (no heavy imports beyond torch, when asked)."""

from __future__ import annotations


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), where bf16
    autocast speeds work up; elsewhere oneDNN emulates bf16 and it only slows down."""
    import torch

    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def native_bf16(device: str) -> bool:
    """bf16 runs natively on ``device`` (``cpu`` or ``cuda``)."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()
