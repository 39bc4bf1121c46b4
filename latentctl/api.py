"""The Python API the CLI is a thin layer over: load a model by name or path, pick device and precision."""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import load_autoencoder
from .errors import UsageError, WeightsError
from .modules import AutoencoderKL, precision
from .modules.attention import check_backend
from .registry import find_weights, get_entry, sha256_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelInfo:
    """What a loaded model is, as recorded in every latent file it writes."""

    name: str
    weights: str          # path, or "random"
    weights_sha256: str


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX-512 BF16 / AMX); without them bf16 convs are ~100x slower."""
    return precision.cpu_has_bf16_kernels()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute precision. auto: bf16 on GPUs that have it and on CPUs with bf16 kernels, else fp32.

    bf16 keeps the quality (roundtrip PSNR within 0.1 dB of fp32 on real photos, tests/test_default_model.py and
    tests/test_bf16.py) and a batch that overflows is redone in fp32; without bf16 kernels a CPU runs bf16 ~100x
    slower than fp32, so auto keeps fp32 there. fp16 is never chosen automatically: some public VAEs (SDXL)
    overflow in it.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if precision.cpu_has_bf16_kernels() else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose auto, fp32, bf16 or fp16")
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 on CPU: not supported by torch's CPU convolutions; use fp32 or bf16")
    return DTYPES[dtype]


def load(model: str | None = "default", *, weights: str | Path | None = None, device: str = "cpu",
         attn: str = "sdpa", models_file: str | Path | None = None, download: bool = False,
         random_weights: bool = False, scaling_factor: float | None = None,
         shift_factor: float | None = None, dtype: str | torch.dtype = "fp32") -> tuple[AutoencoderKL, ModelInfo]:
    """An AutoencoderKL in eval mode on `device` with its weights in `dtype`, and what it is.

    `model` names an entry of models.toml (scale/shift and the expected architecture come from it);
    `weights` loads a file or diffusers folder instead of (or for) that entry. `dtype`: fp32 (default), bf16,
    fp16, auto (resolve_dtype) or a torch dtype; the model then computes in it (vae.dtype) and takes inputs of
    any float type. GroupNorm affines stay float32 on a CPU (modules/precision.py).
    """
    dev = resolve_device(device)
    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    held = resolve_dtype(dtype, dev)
    check_backend(attn, dev)
    entry = get_entry(model or "default", models_file) if (model or weights is None) else None
    if random_weights:
        if entry is None:
            raise UsageError("--random-weights needs --model NAME (the architecture to build)")
        torch.manual_seed(0)
        vae = AutoencoderKL(entry.config()).eval().requires_grad_(False)
        info = ModelInfo(entry.name, "random", "random")
    else:
        path = Path(weights) if weights is not None else find_weights(entry, download=download)
        sha = sha256_file(path) if path.is_file() else "folder"
        if entry is not None and weights is None and entry.sha256 and sha != entry.sha256:
            raise WeightsError(f"{path}: sha256 {sha[:12]}… does not match models.toml's {entry.sha256[:12]}… "
                               f"for model {entry.name!r} (corrupt or replaced file)")
        overrides = {}
        if entry is not None:   # what the entry says beyond the weights: the latent scale, the attention window
            overrides = {"scaling_factor": entry.scaling_factor, "shift_factor": entry.shift_factor,
                         "attn_window": entry.config().attn_window}
        vae = load_autoencoder(path, **overrides)
        if entry is not None and entry.arch:
            want, got = entry.config(), vae.config
            if (want.z_channels, want.factor) != (got.z_channels, got.factor):
                raise WeightsError(f"{path}: weights have {got.z_channels} latent channels and factor {got.factor}, "
                                   f"model {entry.name!r} expects {want.z_channels} and {want.factor}")
        info = ModelInfo(entry.name if entry else Path(path).stem, str(path), sha)
    if scaling_factor is not None:
        vae.config.scaling_factor = scaling_factor
    if shift_factor is not None:
        vae.config.shift_factor = shift_factor
    vae.set_attn_backend(attn)
    if dev.type == "cpu":
        # oneDNN's CPU convolutions run ~1.4x faster on NHWC (measured with `latentctl bench --memory-format`);
        # on an H200 NCHW was faster (benchmarks/gpu_check.py), so CUDA keeps the default layout.
        vae = vae.to(memory_format=torch.channels_last)
    return precision.hold(vae.to(dev), held), info
