"""The trainer side: a torch Dataset over a folder of latent files, and a batch sampler of one bucket at a time.

    from torch.utils.data import DataLoader
    from latentctl.data import BucketBatchSampler, LatentDataset

    data = LatentDataset("latents/", flip="random", seed=0)       # folder written by `latentctl encode`
    sampler = BucketBatchSampler(data, batch_size=16, seed=0)     # rank/world size from torch.distributed
    loader = DataLoader(data, batch_sampler=sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch); data.set_epoch(epoch)
        for batch in loader:
            batch["latent"]    # (B, C, h, w) model-ready; batch["time_ids"] (B, 6): SDXL's add_time_ids

Each item is a dict: `latent` (float32, model-ready), `flipped` (bool), `caption` (str, "" when none), `bucket`
("WxH"), `original_size`, `crop_top_left`, `target_size` (int64 pairs, (H, W)-style as SDXL orders them),
`time_ids` (the three pairs in one float32 tensor of 6), `index`, `path`.

Randomness (a fresh posterior sample, the random flip) is drawn per item from (seed, epoch, index) when a seed is
given, so it does not depend on workers, batch order or rank; call set_epoch() before each epoch (DataLoader workers
copy the dataset when an epoch's iterator starts, unless persistent_workers=True, where the epoch never reaches them:
leave seed=None there and the draws come from torch's per-worker generator). Without a seed, torch's generator.

Both output layouts are read: latent files (NAME.safetensors, caption NAME.txt beside it) and WebDataset tar
shards (`encode --to wds`: members KEY.latent.safetensors, caption KEY.txt), found under `root` by extension.
"""

import hashlib
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from torch.utils.data import Dataset, Sampler

from .errors import InputError

FLIPS = ("never", "random", "always")
LATENT_MEMBER = ".latent.safetensors"   # a sample's latent inside a tar shard (KEY.latent.safetensors)


@dataclass(frozen=True)
class _Member:
    """A sample inside a tar shard: where its latent file's bytes are, and its caption's if it has one."""

    tar: Path
    key: str
    offset: int
    size: int
    caption: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{self.tar}:{self.key}"

    def read(self, span: tuple[int, int] | None = None) -> bytes:
        offset, size = span or (self.offset, self.size)
        with open(self.tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise InputError(f"{self}: the shard is shorter than its member (truncated?)")
        return data


def _header(data: bytes) -> tuple[dict, dict]:
    """(metadata, {tensor: shape}) from the start of a safetensors file's bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    return meta, {k: v["shape"] for k, v in header.items()}


def _tar_members(path: Path) -> list[_Member]:
    """The samples of one shard, by the WebDataset rule: KEY is the member name up to the first dot of its file
    name; KEY.latent.safetensors is the latent, KEY.txt the caption."""
    found, captions = {}, {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                if not stem:  # hidden names are no sample's (as in the shard reader of latentctl.pipeline)
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if "." + ext == LATENT_MEMBER:
                    found[key] = (m.offset_data, m.size)
                elif ext == "txt":
                    captions[key] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: not a readable tar shard ({e})") from None
    return [_Member(path, k, *found[k], captions.get(k)) for k in sorted(found)]


def _pair(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if not text:
        return default
    a, b = (int(v) for v in text.split(","))
    return a, b


def _draw_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class LatentDataset(Dataset):
    """Latent files and tar shards under `root` (from `latentctl encode`; any .safetensors with a `latent`
    (C, h, w) tensor).

    flip: never | random (each item, each epoch, a fair coin) | always; random and always need files written
    with `encode --flip`. sample_posterior: files written with `--store posterior` yield a fresh sample
    (mean + exp(logvar / 2) * noise, then scaled as `latent` is); otherwise the stored `latent`."""

    def __init__(self, root, *, flip: str = "never", sample_posterior: bool = True, seed: int | None = None):
        if flip not in FLIPS:
            raise ValueError(f"flip={flip!r}: choose {', '.join(FLIPS)}")
        self.root, self.flip, self.sample_posterior, self.seed, self.epoch = Path(root), flip, sample_posterior, seed, 0
        if not self.root.is_dir():
            raise InputError(f"{root}: not a folder")
        files = sorted(p for p in self.root.rglob("*") if not p.name.startswith(".") and p.is_file())
        self.paths: list = [p for p in files if p.suffix == ".safetensors"]  # a file, or a _Member of a shard
        for tar in (p for p in files if p.suffix == ".tar"):
            self.paths += _tar_members(tar)
        if not self.paths:
            raise InputError(f"{root}: no .safetensors latent files and no tar shards with latents")
        self.meta, self.shapes = [], []
        for path in self.paths:
            meta, keys = self._header(path)
            if "latent" not in keys or len(keys["latent"]) != 3:
                raise InputError(f"{path}: no `latent` tensor of shape (C, h, w)")
            if flip != "never" and "latent_flipped" not in keys:
                raise InputError(f"{path}: no `latent_flipped` (encode with --buckets ... --flip for flip={flip!r})")
            meta["_posterior"] = str("mean" in keys and "logvar" in keys)
            self.meta.append(meta)
            self.shapes.append(tuple(keys["latent"]))

    @staticmethod
    def _header(path) -> tuple[dict, dict]:
        try:
            if isinstance(path, _Member):
                with open(path.tar, "rb") as f:
                    f.seek(path.offset)
                    head = f.read(8)
                    head += f.read(int.from_bytes(head, "little"))
                return _header(head)
            with safe_open(str(path), "pt") as f:
                return dict(f.metadata() or {}), {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None

    @staticmethod
    def _tensors(path, names: list[str]) -> list[torch.Tensor]:
        try:
            if isinstance(path, _Member):
                tensors = load_bytes(path.read())
                return [tensors[n] for n in names]
            with safe_open(str(path), "pt") as f:
                return [f.get_tensor(n) for n in names]
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: cannot read ({e})") from None

    @property
    def bucket_keys(self) -> list[str]:
        """Per item, what BucketBatchSampler groups by: the bucket, else the latent's shape."""
        return [m.get("bucket") or "x".join(map(str, s)) for m, s in zip(self.meta, self.shapes)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _generator(self, index: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(_draw_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> dict:
        path, meta, (_, h, w) = self.paths[index], self.meta[index], self.shapes[index]
        g = self._generator(index)
        flipped = self.flip == "always" or (self.flip == "random" and bool(torch.rand((), generator=g) < 0.5))
        suffix = "_flipped" if flipped else ""
        if self.sample_posterior and meta["_posterior"] == "True":
            mean, logvar = (t.float() for t in self._tensors(path, ["mean" + suffix, "logvar" + suffix]))
            noise = torch.randn(mean.shape, generator=g)
            z = mean + torch.exp(0.5 * logvar) * noise
            if meta.get("scaled") != "false":  # model-ready, as the stored `latent` is: (z - shift) * scale
                z = (z - float(meta.get("shift_factor") or 0)) * float(meta.get("scaling_factor") or 1)
            latent = z
        else:
            latent = self._tensors(path, ["latent" + suffix])[0].float()
        factor = int(meta.get("factor") or 8)
        original = _pair(meta.get("original_size"), (int(meta.get("height") or h * factor),
                                                     int(meta.get("width") or w * factor)))
        crop = _pair(meta.get("crop_top_left" + suffix), (0, 0))
        target = _pair(meta.get("target_size"), (h * factor, w * factor))
        return {"latent": latent, "flipped": flipped, "caption": self._caption(path, meta),
                "bucket": meta.get("bucket") or f"{w * factor}x{h * factor}",
                "original_size": torch.tensor(original), "crop_top_left": torch.tensor(crop),
                "target_size": torch.tensor(target), "time_ids": torch.tensor([*original, *crop, *target],
                                                                              dtype=torch.float32),
                "index": index, "path": str(path)}

    @staticmethod
    def _caption(path, meta: dict) -> str:
        """The caption: KEY.txt in the shard, or NAME.txt beside the latent file; else NAME.txt beside the source
        image; else metadata `caption`; else ""."""
        if isinstance(path, _Member) and path.caption is not None:
            return path.read(path.caption).decode("utf-8", "replace").strip()
        candidates = [] if isinstance(path, _Member) else [path.with_suffix(".txt")]
        if meta.get("source"):
            candidates.append(Path(meta["source"]).with_suffix(".txt"))
        for c in candidates:
            if c.is_file():
                return c.read_text(encoding="utf-8").strip()
        return meta.get("caption", "")


class BucketBatchSampler(Sampler):
    """Batches of indices that share one bucket (so their latents stack), for DataLoader(batch_sampler=...).

    Each epoch: every bucket's indices shuffled, cut into batches of batch_size (a short last batch dropped with
    drop_last), the batches shuffled; all from (seed, epoch), so every rank computes the same list. Rank r of
    world_size takes batches r, r + world_size, ...; to give every rank as many batches, the list is cut to a
    multiple of world_size (drop_last) or filled up by repeating its first batches (as DistributedSampler does).
    `keys`: a LatentDataset (its bucket_keys) or one key per item."""

    def __init__(self, keys, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        keys = list(keys.bucket_keys if hasattr(keys, "bucket_keys") else keys)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
            world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            self.groups.setdefault(str(key), []).append(i)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of the epoch, before the split (the same list on every rank)."""
        rng = random.Random(_draw_seed(self.seed, self.epoch if epoch is None else epoch, "batches"))
        out = []
        for key in sorted(self.groups):
            indices = list(self.groups[key])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        if self.shuffle:
            rng.shuffle(out)
        if self.world_size > 1 and out:
            if self.drop_last:
                out = out[:len(out) - len(out) % self.world_size]
            else:
                n = len(out)
                out += [out[i % n] for i in range(-n % self.world_size)]  # repeat from the start
        return out

    def __iter__(self):
        yield from self.batches()[self.rank::self.world_size]

    def __len__(self) -> int:
        full = sum(len(g) // self.batch_size for g in self.groups.values())
        n = full if self.drop_last else full + sum(bool(len(g) % self.batch_size) for g in self.groups.values())
        if self.world_size > 1:
            n = n // self.world_size if self.drop_last else -(-n // self.world_size)
        return n
