"""Which part of the work list this process does: `--shard K/N`, or the launcher's environment.

N processes started anywhere (torchrun, srun, by hand) each take a part of the same list. The parts are
disjoint, their union is the whole list, and they depend only on the list (never on timing), so the N runs
together write exactly what one run would. Ranks count from 0, as RANK and SLURM_PROCID do.
"""

import os
from dataclasses import dataclass
from heapq import heapify, heapreplace

from ..errors import UsageError

BY = ("bytes", "count")

# (rank, world size, local rank) variables of each launcher, in the order they are looked at
_LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}


@dataclass(frozen=True)
class Rank:
    index: int = 0          # K in K/N, from 0
    count: int = 1          # N
    local: int = 0          # rank on this machine: picks the GPU (cuda:LOCAL_RANK)
    source: str = "single"  # single | flag | torchrun | slurm

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/4 (K counts from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"environment variable {name}={env[name]!r} is not a number") from None


def current(shard: str | None = None, env=None) -> Rank:
    """This process's rank: --shard K/N if given, else torchrun's or SLURM's variables, else 0/1."""
    env = os.environ if env is None else env
    if shard is not None:
        k, n = parse_shard(shard)
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return Rank(k, n, local, "flag")
    for source, (rank, world, local) in _LAUNCHERS.items():
        if rank in env and world in env:
            k, n = _int(env, rank), _int(env, world)
            if n < 1 or not 0 <= k < n:
                raise UsageError(f"{rank}={k} and {world}={n} from {source}: need 0 <= rank < world size")
            return Rank(k, n, _int(env, local) if local in env else 0, source)
    return Rank()


def device_for(rank: Rank, device: str, cuda_count: int) -> str:
    """--device auto under a launcher: cuda:LOCAL_RANK (modulo the GPUs here) when CUDA is there."""
    if device != "auto" or rank.count == 1 or cuda_count == 0:
        return device
    return f"cuda:{rank.local % cuda_count}"


def split(items: list, count: int, *, by: str = "count", size=None) -> list[list]:
    """The N parts of `items`, each in the list's order. Deterministic for a given list.

    by="count": item i goes to part i mod N (sizes differ by at most one).
    by="bytes": largest first, each to the part with the fewest bytes so far (ties: fewer items, then the lower
    part); the parts' bytes then differ by at most the largest item. size(item) -> bytes (0 for an item that cannot be read).
    """
    if by not in BY:
        raise UsageError(f"--shard-by {by!r}: choose {', '.join(BY)}")
    if count < 1:
        raise UsageError("the number of parts must be at least 1")
    owner = [0] * len(items)
    if by == "count":
        owner = [i % count for i in range(len(items))]
    else:
        sizes = [size(item) for item in items]
        loads = [(0, 0, part) for part in range(count)]  # a heap of (bytes so far, items so far, part)
        heapify(loads)
        for i in sorted(range(len(items)), key=lambda i: (-sizes[i], i)):
            total, n, part = loads[0]
            owner[i] = part
            heapreplace(loads, (total + sizes[i], n + 1, part))
    parts = [[] for _ in range(count)]
    for i, item in enumerate(items):
        parts[owner[i]].append(item)
    return parts


def file_size(item) -> int:
    """Bytes of an item's input file, 0 when it cannot be read (it becomes that rank's error line)."""
    try:
        return os.stat(item.path).st_size
    except (OSError, AttributeError):
        return 0


def select(items: list, rank: Rank, by: str = "count") -> list:
    """This rank's part of `items`."""
    if rank.count == 1:
        return items
    return split(items, rank.count, by=by, size=file_size)[rank.index]
