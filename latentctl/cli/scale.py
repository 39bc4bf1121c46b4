"""The scale-out flags of encode/decode: which rank this process is, which device it takes, its part of the items."""

import torch

from ..dist import ranks
from ..dist.progress import ProgressWriter
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


def counted(planned: list, rank: ranks.Rank, shard_by: str):
    """part() for datasets.plan_*: this rank's part, noting in `planned` how many items the whole job has."""
    def part(items: list) -> list:
        planned[:] = [len(items)]
        return ranks.select(items, rank, shard_by)
    return part


def progress(out, rank: ranks.Rank, planned: list, items: list, claims) -> ProgressWriter:
    """This run's progress file in OUT/ (read by `latentctl status`); planned: [items of the whole job]."""
    try:
        return ProgressWriter(out, rank.index, rank.count, planned[0] if planned else len(items), len(items),
                              claims=claims)
    except OSError as e:
        raise UsageError(f"--output {out}: cannot write there: {e.strerror or e}") from None


ENGINES = ("threads", "ray")


def engine(name: str, ray_address: str | None):
    """(encode function, its extra arguments) for --engine; (None, None) for the default threads."""
    if name not in ENGINES:
        raise UsageError(f"--engine {name!r}: choose {', '.join(ENGINES)}")
    if name == "threads":
        if ray_address is not None:
            raise UsageError("--ray-address goes with --engine ray")
        return None, None
    from ..engines import ray as ray_engine

    ray_engine.check_installed()
    return ray_engine.encode_files, dict(address=ray_address)


def check_engine_items(items, to: str) -> None:
    """--engine ray encodes image files to latent files; tar shards and clips go through the default engine."""
    from ..pipeline.media import is_clip

    if to != "files" or not isinstance(items, list):
        raise UsageError("--engine ray encodes image files to latent files (not tar shards, not --to wds) for now")
    clips = [item.source for item in items if item.error is None and is_clip(item.path)]
    if clips:
        raise UsageError(f"--engine ray encodes images; {clips[0]} is a clip (use the default engine for clips)")
