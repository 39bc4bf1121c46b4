import os
import subprocess
import sys

import pytest
import torch

# Tests never touch the network: the Hugging Face libraries must work from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args, input=None, env=None, timeout=300, cwd=None):
    """Run `python -m latentctl ARGS` in a fresh process; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "latentctl", *map(str, args)], input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli
