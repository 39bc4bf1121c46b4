"""latentctl: images to VAE latents and back, fast and exactly.

    import latentctl
    vae, info = latentctl.load("default")          # or load(weights="path/to/vae.safetensors")
    z = vae.encode(images * 2 - 1).mean            # images (B, 3, H, W) in [0, 1]
    images = (vae.decode(z) + 1) / 2
"""

__version__ = "0.1.0"

from .api import load, resolve_device, resolve_dtype  # noqa: E402
from .checkpoints import load_autoencoder  # noqa: E402
from .modules import AEConfig, AutoencoderKL  # noqa: E402

__all__ = ["AEConfig", "AutoencoderKL", "load", "load_autoencoder", "resolve_device", "resolve_dtype", "__version__"]
