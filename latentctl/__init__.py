"""latentctl: images to VAE latents and back, fast and exactly.

    import latentctl
    vae, info = latentctl.load("default")          # or load(weights="path/to/vae.safetensors")
    z = vae.encode(images * 2 - 1).mean            # images (B, 3, H, W) in [0, 1]
    images = (vae.decode(z) + 1) / 2

The names below are imported on first use, so that `import latentctl` (and the command line's signal handlers,
installed first thing in latentctl/__main__.py) does not wait for torch.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"load": ".api", "resolve_device": ".api", "resolve_dtype": ".api", "load_autoencoder": ".checkpoints",
         "AEConfig": ".modules", "AutoencoderKL": ".modules"}

__all__ = ["AEConfig", "AutoencoderKL", "load", "load_autoencoder", "resolve_device", "resolve_dtype", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'latentctl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
