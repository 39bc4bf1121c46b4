"""latentctl: images to VAE latents and back."""

__version__ = "0.1.0"
