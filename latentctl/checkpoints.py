"""Read VAE weights from any common file, convert diffusers names to the original ones, infer the architecture.

Files: .safetensors; .ckpt/.pt/.pth/.bin through torch.load(weights_only=True) only (a pickle that needs
more is refused, never executed); a diffusers folder (config.json + diffusion_pytorch_model.*).
Layouts: original LDM/SGM keys, possibly under {"state_dict": ...} and a `first_stage_model.` or `vae.`
prefix (full Stable Diffusion checkpoints), or diffusers keys, for any number of levels.
"""

import json
import pickle
import re
from pathlib import Path

import torch

from .errors import WeightsError
from .modules import AEConfig, AutoencoderKL

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREFIXES = ("first_stage_model.", "vae.")


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw tensors in a weights file or diffusers folder, as stored (no renaming)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in DIFFUSERS_FILES if (path / f).is_file()]
        found += [path / "vae" / f for f in DIFFUSERS_FILES if (path / "vae" / f).is_file()]
        if not found:
            raise WeightsError(f"{path}: folder holds no {' or '.join(DIFFUSERS_FILES)}")
        path = found[0]
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).splitlines()[-1] if str(e) else ""
            raise WeightsError(f"{path}: refused: this pickle needs more than plain tensors to load, and "
                               f"latentctl never runs code from a weights file ({first.strip()[:160]})") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise WeightsError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                               f"{str(e).splitlines()[0][:200]}") from None
        if not isinstance(obj, dict):
            raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
        return obj
    raise WeightsError(f"{path}: unknown weights file type {path.suffix!r} "
                       "(use .safetensors, .ckpt, .pt, .pth, .bin or a diffusers folder)")


def extract_vae(sd: dict) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...}, keep a full checkpoint's VAE part, drop training-only entries."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in sd.items()
            if isinstance(v, torch.Tensor) and not k.startswith(("loss.", "model_ema."))}


def is_diffusers_layout(sd: dict) -> bool:
    return any(".down_blocks." in f".{k}" or ".mid_block." in f".{k}" or ".up_blocks." in f".{k}" for k in sd)


# Renames inside a block, diffusers -> original.
_RENAMES = [
    (".conv_shortcut.", ".nin_shortcut."), (".time_emb_proj.", ".temb_proj."),
    (".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".to_out.0.", ".proj_out."),
    (".query.", ".q."), (".key.", ".k."), (".value.", ".v."), (".proj_attn.", ".proj_out."),  # old diffusers names
]
_TOP = {"conv_norm_out.": "norm_out.", "time_embedding.linear_1.": "temb.dense.0.",
        "time_embedding.linear_2.": "temb.dense.1."}


def diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to the original ones, for the VAE (encoder./decoder.) and the U-Net (no prefix).

    up_blocks are stored lowest resolution first in diffusers and highest first in the original, so
    their index is flipped using the number of levels found in the file. Attention projections are
    Linear [C, C] in diffusers and 1x1 convs [C, C, 1, 1] in the original.
    """
    ups: dict[str, int] = {}
    for k in sd:
        m = re.match(r"(.*?)up_blocks\.(\d+)\.", k)
        if m:
            ups[m.group(1)] = max(ups.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for key, value in sd.items():
        m = re.match(r"((?:encoder\.|decoder\.)?)(.*)", key)
        pre, k = m.group(1), m.group(2)
        for old, new in _TOP.items():
            if k.startswith(old):
                k = new + k[len(old):]
        k = re.sub(r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn.", k)
        k = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda g: f"mid.block_{int(g.group(1)) + 1}.", k)
        k = re.sub(r"^mid_block\.attentions\.0\.", "mid.attn_1.", k)
        m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.(.*)", k)
        if m:
            level = ups[pre] - 1 - int(m.group(1))
            part = {"resnets": "block.", "attentions": "attn.", "upsamplers.0": "upsample."}[m.group(2)]
            k = f"up.{level}.{part}{m.group(3)}"
        k = "." + k
        for old, new in _RENAMES:
            k = k.replace(old, new)
        k = pre + k[1:]
        if re.search(r"\.(q|k|v|proj_out)\.weight$", k) and value.ndim == 2:
            value = value[:, :, None, None]
        out[k] = value
    return out


def infer_config(sd: dict[str, torch.Tensor], source: str = "weights") -> AEConfig:
    """The AEConfig whose state dict has exactly these keys and shapes (original layout)."""
    need = ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise WeightsError(f"{source}: not a KL autoencoder: no {_few(missing, 2)} "
                           f"(it holds {len(sd)} tensors, e.g. {_few(sd.keys(), 3)})")
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    ch = sd["encoder.conv_in.weight"].shape[0]
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    num_res_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    z = sd["decoder.conv_in.weight"].shape[1]
    use_quant = "quant_conv.weight" in sd
    use_post_quant = "post_quant_conv.weight" in sd
    embed_dim = sd["post_quant_conv.weight"].shape[1] if use_post_quant else z
    if "encoder.mid.attn_1.q.weight" in sd:
        mid_attn = "vanilla"
    elif "encoder.mid.attn_1.to_qkv.weight" in sd:
        mid_attn = "linear"
    else:
        mid_attn = "none"
    attn_levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))})
    resolution = 256
    # calibrated statistics saved beside the decoder's norms: FixedGroupNorm (they define the network's function)
    decoder_norm = "fixed" if any(re.match(r"decoder\..*\.fixed_mean$", k) for k in sd) else "group"
    return AEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z, embed_dim=embed_dim,
                    in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0],
                    attn_resolutions=tuple(resolution >> i for i in attn_levels), resolution=resolution,
                    mid_attn=mid_attn, use_quant_conv=use_quant, use_post_quant_conv=use_post_quant,
                    decoder_norm=decoder_norm)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A VAE state dict in the original layout, from any supported file or folder."""
    sd = extract_vae(read_tensors(path))
    if is_diffusers_layout(sd):
        sd = diffusers_to_ldm(sd)
    return sd


def diffusers_config(path: str | Path) -> dict:
    """config.json of a diffusers folder (or of the folder holding a diffusers weights file), or {}."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for cand in (folder / "config.json", folder / "vae" / "config.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
    return {}


def build_from_state_dict(sd: dict[str, torch.Tensor], source: str = "weights", **overrides) -> AutoencoderKL:
    """Infer the architecture, build it, and load the weights strictly with readable errors."""
    config = infer_config(sd, source)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoencoderKL(config)
    expected = model.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
        raise WeightsError(f"{source}: does not match the inferred architecture: {'; '.join(parts)}")
    bad = [k for k in expected if expected[k].shape != sd[k].shape]
    if bad:
        k = bad[0]
        raise WeightsError(f"{source}: {len(bad)} tensors have the wrong shape, e.g. {k}: "
                           f"{tuple(sd[k].shape)} in the file, {tuple(expected[k].shape)} expected")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval().requires_grad_(False)


def load_autoencoder(path: str | Path, **overrides) -> AutoencoderKL:
    """Load any supported VAE weights into AutoencoderKL (architecture read from the weights)."""
    sd = load_state_dict(path)
    cfg = diffusers_config(path)
    if "scaling_factor" in cfg and "scaling_factor" not in overrides:
        overrides["scaling_factor"] = float(cfg["scaling_factor"])
    if cfg.get("shift_factor") is not None and "shift_factor" not in overrides:
        overrides["shift_factor"] = float(cfg["shift_factor"])
    return build_from_state_dict(sd, str(path), **overrides)
