"""Option definitions shared by the commands, so a flag reads the same everywhere."""

from pathlib import Path
from typing import Optional

import typer

Model = typer.Option(None, "--model", "-m", help="Model name from models.toml (default: the shipped 'default').")
Weights = typer.Option(None, "--weights", "-w", help="Weights file or diffusers folder (overrides the model's).")
ModelsFile = typer.Option(None, "--models", help="Extra models.toml that adds or overrides entries.")
Device = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
Dtype = typer.Option("auto", "--dtype", help="Compute precision: auto | fp32 | bf16 | fp16. auto picks the fastest "
                                               "safe one (bf16 on GPUs, fp32 on CPUs without bf16 kernels).")
Attn = typer.Option("sdpa", "--attn", help="Attention backend: sdpa (torch, default) | xformers (CUDA, optional "
                                           "extra) | linear (O(N); on ordinary checkpoints an approximation).")
Download = typer.Option(False, "--download", help="Download the model's weights if they are not on this machine.")
Json = typer.Option(False, "--json", help="One JSON object per line on stdout.")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr (errors still shown).")

__all__ = ["Attn", "Device", "Download", "Dtype", "Json", "Model", "ModelsFile", "Optional", "Path", "Quiet",
           "Weights"]
