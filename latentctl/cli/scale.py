"""The scale-out flags of encode/decode: which rank this process is, which device it takes, its part of the items."""

import torch

from ..dist import ranks
from ..errors import UsageError


def setup(shard: str | None, shard_by: str, device: str) -> tuple[ranks.Rank, str]:
    """(this process's rank, the device it uses): --shard K/N or the launcher's variables; under a launcher
    --device auto becomes cuda:LOCAL_RANK when CUDA is there."""
    if shard_by not in ranks.BY:
        raise UsageError(f"--shard-by {shard_by!r}: choose {', '.join(ranks.BY)}")
    rank = ranks.current(shard)
    return rank, ranks.device_for(rank, device, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def part(items: list, rank: ranks.Rank, shard_by: str) -> list:
    """This rank's items; a usage error when nothing at all was found (a rank may get none of few items)."""
    if not items:
        raise UsageError("no input files found")
    return ranks.select(items, rank, shard_by)
