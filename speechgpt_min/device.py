"""Which device to compute on, and whether bf16 pays off there: the one place that asks the hardware.

    device = resolve_device("auto")    # CUDA if present, else Apple MPS, else CPU
    resolve_device("cuda:1")           # a named device, checked: a clear error where it is missing
    fast_bfloat16(device)              # True where bf16 autocast is faster than float32
"""
import torch


def resolve_device(name="auto"):
    """"auto" -> CUDA if available, else Apple MPS, else CPU; any other name is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but Apple MPS is not available here")
    return device


def fast_bfloat16(device):
    """Does bf16 autocast pay off here? On CUDA GPUs that support bf16, and on CPUs with bf16 matrix
    instructions (AVX512-BF16 or AMX); elsewhere CPU bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
