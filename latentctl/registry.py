"""Named models: read models.toml (shipped, per-user, --models FILE) and find each model's weights.

Weights are looked for, in order: an explicit path; the entry's `path`; the local Hugging Face cache
(read by hand from its documented layout, so no network and no extra package); a download, only when
asked for (`latentctl models pull`, `--download`), through the optional huggingface_hub.
"""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ModelError, WeightsError
from .modules import AEConfig

PACKAGE_MODELS = Path(__file__).with_name("models.toml")
ARCH_KEYS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "quant_conv", "mid_attn", "attn_window",
             "decoder_norm")


@dataclass
class ModelEntry:
    name: str
    description: str = ""
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    path: Path | None = None          # absolute, resolved against the file that named it
    repo: str | None = None
    subfolder: str = ""
    filename: str = "diffusion_pytorch_model.safetensors"
    revision: str = "main"
    sha256: str | None = None         # of the file at `path` (checked at load)
    known_sha256: list[str] = field(default_factory=list)  # published files with these settings (recognised)
    arch: dict = field(default_factory=dict)

    def config(self) -> AEConfig:
        """The architecture this entry declares (used for --random-weights and to check loaded weights)."""
        a = self.arch
        z = int(a.get("z_channels", 4))
        quant = bool(a.get("quant_conv", True))
        return AEConfig(ch=int(a.get("ch", 128)), ch_mult=tuple(a.get("ch_mult", (1, 2, 4, 4))),
                        num_res_blocks=int(a.get("num_res_blocks", 2)), z_channels=z, embed_dim=z,
                        mid_attn=a.get("mid_attn", "vanilla"), use_quant_conv=quant, use_post_quant_conv=quant,
                        attn_window=int(a.get("attn_window", 0)), decoder_norm=a.get("decoder_norm", "group"),
                        scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)


def user_models_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "latentctl" / "models.toml"


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ModelError(f"{path}: cannot read models file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ModelError(f"{path}: not valid TOML: {e}") from None


def load_registry(models_file: str | Path | None = None) -> dict[str, ModelEntry]:
    """All named models: the shipped file, then the user's file, then --models FILE; later entries override keys."""
    raw: dict[str, dict] = {}
    files = [PACKAGE_MODELS, user_models_file()]
    if models_file is not None:
        if not Path(models_file).is_file():
            raise ModelError(f"{models_file}: no such models file")
        files.append(Path(models_file))
    for f in files:
        if not f.is_file():
            continue
        for name, values in _read_toml(f).items():
            if not isinstance(values, dict):
                raise ModelError(f"{f}: entry {name!r} must be a table ([{name}])")
            values = dict(values)
            if "path" in values:
                values["path"] = (f.parent / os.path.expanduser(values["path"])).resolve()
            raw.setdefault(name, {}).update(values)
    entries = {}
    for name, v in raw.items():
        arch = {k: v.pop(k) for k in ARCH_KEYS if k in v}
        known = ModelEntry.__dataclass_fields__.keys() - {"name", "arch"}
        unknown = set(v) - known
        if unknown:
            raise ModelError(f"model {name!r}: unknown keys {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(known | set(ARCH_KEYS)))})")
        hashes = v.get("known_sha256", [])
        if not isinstance(hashes, list) or not all(isinstance(h, str) and len(h) == 64 for h in hashes):
            raise ModelError(f"model {name!r}: known_sha256 must be a list of 64-digit hex sha256 strings")
        v["known_sha256"] = [h.lower() for h in hashes]
        entries[name] = ModelEntry(name=name, arch=arch, **v)
    return entries


def get_entry(name: str, models_file: str | Path | None = None) -> ModelEntry:
    registry = load_registry(models_file)
    if name not in registry:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(registry)} "
                         "(or pass --weights PATH)")
    return registry[name]


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def hf_cache_lookup(repo: str, filename: str, subfolder: str = "", revision: str = "main") -> Path | None:
    """The cached file for repo/subfolder/filename at revision, or None (no network)."""
    root = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    candidate = root / "snapshots" / commit / subfolder / filename
    return candidate if candidate.is_file() else None


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """The file's sha256 (remembered per path, size and mtime: a run that hashes a model twice reads it once)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def entry_for_sha256(sha: str, registry: dict[str, ModelEntry]) -> ModelEntry | None:
    """The entry whose own file (`sha256`) or one of whose published files (`known_sha256`) has this hash."""
    for entry in registry.values():
        if sha == entry.sha256 or sha in entry.known_sha256:
            return entry
    return None


def find_weights(entry: ModelEntry, download: bool = False) -> Path:
    """Where this entry's weights are on this machine (a file; diffusers config.json sits beside it)."""
    if entry.path is not None:
        if not entry.path.exists():
            raise WeightsError(f"model {entry.name!r}: weights file {entry.path} does not exist")
        return entry.path
    if not entry.repo:
        raise WeightsError(f"model {entry.name!r}: no `path` or `repo` in its models.toml entry")
    found = hf_cache_lookup(entry.repo, entry.filename, entry.subfolder, entry.revision)
    if found is not None:
        return found
    where = f"{entry.repo}/{entry.subfolder + '/' if entry.subfolder else ''}{entry.filename}"
    if download:
        return download_weights(entry)
    raise WeightsError(f"model {entry.name!r}: weights not found on this machine (looked in the Hugging Face cache "
                       f"{hf_cache_dir()} for {where}). Run `latentctl models pull {entry.name}` where there is "
                       f"network, or download {where} and pass --weights PATH")


def download_weights(entry: ModelEntry) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError("downloading needs huggingface_hub: pip install 'latentctl[hub]'") from None
    sub = entry.subfolder or None
    try:
        if entry.filename.startswith("diffusion_pytorch_model"):
            hf_hub_download(entry.repo, "config.json", subfolder=sub, revision=entry.revision)
        return Path(hf_hub_download(entry.repo, entry.filename, subfolder=sub, revision=entry.revision))
    except Exception as e:  # network, auth, gated repo: all reported the same way, on one line
        raise WeightsError(f"model {entry.name!r}: download of {entry.repo} failed: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
