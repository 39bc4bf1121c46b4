"""The Python API the CLI is a thin layer over: load a model by name or path, pick device and precision."""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import diffusers_config, load_autoencoder
from .errors import UsageError, WeightsError
from .modules import AutoencoderKL, precision
from .modules.attention import check_backend
from .registry import ModelEntry, entry_for_sha256, find_weights, get_entry, load_registry, sha256_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelInfo:
    """What a loaded model is, as recorded in every latent file it writes."""

    name: str
    weights: str          # path, or "random"
    weights_sha256: str
    settings: str = "given"   # where scale and shift came from (see weights_settings); "unknown": none said


@dataclass
class Settings:
    """Which weights a model name / weights path means, and the latent scale and shift that go with them.

    One rule, the same for latentctl.load() and every command: explicit flags (scaling_factor=, shift_factor=)
    > the named model's models.toml entry > what the weights say themselves (a diffusers config.json beside
    them) > a published file recognised by its sha256 (`known_sha256` in models.toml) > unknown. Unknown
    settings load (the model is usable) but nothing writes model-ready latents with them (see require_scale).
    """

    name: str                         # the entry's name, or the weights file's stem
    entry: ModelEntry | None          # the named or recognised models.toml entry
    path: Path | None                 # weights file or folder; None for --random-weights
    sha256: str                       # of the file; "folder" or "random" otherwise
    scaling_factor: float | None
    shift_factor: float | None
    source: str                       # "flags" | "model NAME" | "config.json" | "sha256 (NAME)" | "unknown"

    def require_scale(self) -> None:
        """Raise the one-line usage error for weights whose latent scale nobody said."""
        if self.scaling_factor is None:
            raise UsageError(f"{self.path}: no latent scale known for these weights (no --model, no config.json "
                             "beside them, not a known public file); pass --model NAME, or --scaling-factor S "
                             "(and --shift-factor F) as the model they are for expects")


def _config_settings(path: Path) -> tuple[float | None, float | None]:
    cfg = diffusers_config(path)
    kind = str(cfg.get("_class_name", "AutoencoderKL"))
    if "Autoencoder" not in kind:   # a config.json of something else that happens to sit beside the file
        return None, None
    try:
        scale = float(cfg["scaling_factor"]) if cfg.get("scaling_factor") is not None else None
        shift = float(cfg["shift_factor"]) if cfg.get("shift_factor") is not None else None
    except (TypeError, ValueError):
        raise WeightsError(f"{path}: config.json scaling_factor/shift_factor are not numbers") from None
    return scale, shift


def weights_settings(model: str | None = None, *, weights: str | Path | None = None,
                     models_file: str | Path | None = None, download: bool = False, random_weights: bool = False,
                     scaling_factor: float | None = None, shift_factor: float | None = None) -> Settings:
    """The weights and latent settings that load() uses for these arguments (see Settings for the rule).

    No model and no weights: the shipped 'default'. A model name: its entry (and its weights unless `weights`
    is given). Weights alone: never any entry's settings, unless the file is one of the published files an
    entry lists by sha256.
    """
    if model is None and weights is None:
        model = "default"
    entry = get_entry(model, models_file) if model is not None else None
    if random_weights:
        if entry is None:
            raise UsageError("--random-weights needs --model NAME (the architecture to build)")
        path, sha = None, "random"
    else:
        path = Path(weights) if weights is not None else find_weights(entry, download=download)
        if not path.exists():
            raise WeightsError(f"{path}: no such file")
        sha = sha256_file(path) if path.is_file() else "folder"
        if entry is not None and weights is None and entry.sha256 and sha != entry.sha256:
            raise WeightsError(f"{path}: sha256 {sha[:12]}… does not match models.toml's {entry.sha256[:12]}… "
                               f"for model {entry.name!r} (corrupt or replaced file)")
    # each source in the order of the rule; the first that gives a scale decides the source's name
    sources = [("flags", scaling_factor, shift_factor)]
    if entry is not None:
        sources.append((f"model {entry.name}", entry.scaling_factor, entry.shift_factor))
    elif path is not None:
        sources.append(("config.json", *_config_settings(path)))
        known = entry_for_sha256(sha, load_registry(models_file)) if path.is_file() else None
        if known is not None:
            entry = known
            sources.append((f"sha256 ({known.name})", known.scaling_factor, known.shift_factor))
    scale = next((s for _, s, _ in sources if s is not None), None)
    source = next((name for name, s, _ in sources if s is not None), "unknown")
    shift = next((f for _, _, f in sources if f is not None), None)
    if scale is not None and shift is None:
        shift = 0.0   # a source that gives a scale and no shift means none (SD 1.x/SDXL configs: shift null)
    name = entry.name if entry is not None else Path(path).stem
    return Settings(name, entry, path, sha, scale, shift, source)


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


def load(model: str | None = None, *, weights: str | Path | None = None, device: str = "cpu",
         attn: str = "sdpa", models_file: str | Path | None = None, download: bool = False,
         random_weights: bool = False, scaling_factor: float | None = None,
         shift_factor: float | None = None, dtype: str | torch.dtype = "fp32") -> tuple[AutoencoderKL, ModelInfo]:
    """An AutoencoderKL in eval mode on `device` with its weights in `dtype`, and what it is.

    `model` names an entry of models.toml (weights, scale/shift, expected architecture); `weights` loads a
    file or diffusers folder instead of (or, with `model`, for) that entry; neither: the shipped 'default'.
    Scale and shift follow weights_settings(); where nothing says, they stay 1 and 0 (raw latents) and
    `info.settings` is "unknown", and encode refuses to write latents with them.
    `dtype`: fp32 (default), bf16, fp16, auto (resolve_dtype) or a torch dtype; the model then computes in it
    (vae.dtype) and takes inputs of any float type. GroupNorm affines stay float32 on a CPU (modules/precision.py).
    """
    dev = resolve_device(device)
    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    held = resolve_dtype(dtype, dev)
    check_backend(attn, dev)
    s = weights_settings(model, weights=weights, models_file=models_file, download=download,
                         random_weights=random_weights, scaling_factor=scaling_factor, shift_factor=shift_factor)
    scale = s.scaling_factor if s.scaling_factor is not None else 1.0
    shift = s.shift_factor if s.shift_factor is not None else 0.0
    if s.path is None:
        torch.manual_seed(0)
        vae = AutoencoderKL(s.entry.config()).eval().requires_grad_(False)
    else:
        # the entry's attention window goes with its weights (the default model was trained with it)
        window = s.entry.config().attn_window if s.entry is not None else 0
        vae = load_autoencoder(s.path, scaling_factor=scale, shift_factor=shift, attn_window=window)
        if s.entry is not None and s.entry.arch:
            want, got = s.entry.config(), vae.config
            if (want.z_channels, want.factor) != (got.z_channels, got.factor):
                raise WeightsError(f"{s.path}: weights have {got.z_channels} latent channels and factor "
                                   f"{got.factor}, model {s.entry.name!r} expects {want.z_channels} and {want.factor}")
    vae.config.scaling_factor, vae.config.shift_factor = scale, shift
    info = ModelInfo(s.name, "random" if s.path is None else str(s.path), s.sha256, s.source)
    vae.set_attn_backend(attn)
    # On a CPU hold() also sets the layout that dtype runs fastest in (precision.cpu_layout: NCHW for fp32 with
    # NNPACK, else channels_last, oneDNN's); on an H200 NCHW was faster (benchmarks/gpu_check.py), CUDA keeps it.
    return precision.hold(vae.to(dev), held), info
