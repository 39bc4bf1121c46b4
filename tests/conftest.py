"""What many test files share: the tiny model, its weights on disk, running the CLI, reading its JSON lines.

Plain helpers (importable: `from conftest import TINY, make_tiny_vae, save_weights, run_main, json_lines`) and
fixtures (`cli`: a fresh `python -m latentctl` process; `tiny_vae`; `tiny_weights`: that model's .safetensors).
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests never touch the network: the Hugging Face libraries must work from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# The smallest model with every kind of layer: two levels (factor 2), 32/64 wide, mid attention, quant convs.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


def tiny_config(**overrides):
    """AEConfig of TINY with `overrides` (e.g. ch_mult=(1, 1, 1, 1) for factor 8, z_channels=8, embed_dim=8)."""
    from latentctl.modules import AEConfig

    return AEConfig(**{**TINY, **overrides})


def make_tiny_vae(seed: int = 0, jitter: float = 0.0, **overrides):
    """A TINY AutoencoderKL in eval mode without gradients, initialised from `seed`. `jitter` adds that much
    Gaussian noise to every parameter (moves norms and biases off their init values, so that they matter)."""
    from latentctl.modules import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(tiny_config(**overrides)).eval().requires_grad_(False)
    if jitter:
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(jitter * torch.randn_like(p))
    return vae


def save_weights(vae, path: Path, scaling_factor: float | None = None, shift_factor: float = 0.0) -> Path:
    """vae's state dict as an LDM-layout .safetensors at `path` (folders made); with `scaling_factor`, a
    config.json beside it states the latent scale and shift (weights need a stated scale to encode with)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    if scaling_factor is not None:
        config = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


def run_cli(*args, input=None, env=None, timeout=300, cwd=None):
    """Run `python -m latentctl ARGS` in a fresh process; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "latentctl", *map(str, args)], input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


def run_main(capsys, *args, stdin: str | None = None, monkeypatch=None, env: dict | None = None):
    """Run the CLI in this process (latentctl.cli.app.main): (exit code, stdout, stderr). stdin and env need
    monkeypatch (they are undone after the test)."""
    from latentctl.cli.app import main

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def run_main_argv(argv) -> int:
    """main(argv) in this process, output left where it goes; returns the exit code."""
    from latentctl.cli.app import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def json_lines(text: str) -> list[dict]:
    """One dict per non-empty line of `--json` output (fails on any line that is not JSON)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def cli():
    """run_cli: the CLI in a fresh process."""
    return run_cli


@pytest.fixture
def tiny_vae():
    return make_tiny_vae()


@pytest.fixture
def tiny_weights(tmp_path):
    """TINY's weights (seed 0) as tmp_path/tiny.safetensors."""
    return save_weights(make_tiny_vae(), tmp_path / "tiny.safetensors")


@pytest.fixture
def direct_convs(monkeypatch):
    """Every convolution on oneDNN's direct kernels (modules/fastconv.py off), for tests that compare two of our
    code paths (tiled and untiled, eager and traced) to 1e-5 or closer: NNPACK's Winograd rounds differently with
    the tile's position, about 1e-5 of a layer's scale. tests/test_fastconv.py bounds the paths with it on."""
    from latentctl.modules import fastconv

    monkeypatch.setattr(fastconv, "nnpack_ready", lambda: False)
