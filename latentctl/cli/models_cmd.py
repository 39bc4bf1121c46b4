"""`latentctl models` (list, pull) and `latentctl info FILE`."""

from pathlib import Path
from typing import Optional

import typer

from .. import registry
from ..checkpoints import infer_config, load_state_dict
from ..errors import WeightsError
from . import options as opt
from . import output
from .help import Command, Group

models_app = typer.Typer(cls=Group, help="List the named models and fetch their weights.", invoke_without_command=True,
                         no_args_is_help=False)


def _where(entry) -> tuple[str, str]:
    try:
        return "yes", str(registry.find_weights(entry))
    except WeightsError:
        where = f"{entry.repo}/{entry.subfolder + '/' if entry.subfolder else ''}{entry.filename}" if entry.repo \
            else str(entry.path)
        return "no", where


@models_app.callback()
def models_list(ctx: typer.Context, models: Optional[Path] = opt.ModelsFile, json: bool = opt.Json):
    """Table of named models: latent channels and factor, scale/shift, weights on this machine or not."""
    if ctx.invoked_subcommand is not None:
        return
    rows = []
    for e in registry.load_registry(models).values():
        c = e.config()
        found, where = _where(e)
        row = {"name": e.name, "channels": c.latent_channels, "factor": c.factor,
               "scaling_factor": e.scaling_factor, "shift_factor": e.shift_factor, "weights_found": found == "yes",
               "weights": where, "description": e.description}
        rows.append(row)
        if json:
            output.json_line(row)
    if not json:
        output.table("latentctl models", ["name", "channels", "factor", "scale", "shift", "found", "weights"],
                     [[r["name"], r["channels"], f"{r['factor']}x", r["scaling_factor"], r["shift_factor"],
                       "yes" if r["weights_found"] else "no", r["weights"]] for r in rows])


@models_app.command("pull", cls=Command)
def models_pull(name: str, models: Optional[Path] = opt.ModelsFile):
    """Download a named model's weights into the Hugging Face cache (needs network and huggingface_hub)."""
    entry = registry.get_entry(name, models)
    path = registry.find_weights(entry, download=True)
    print(path)


def info(file: Path = typer.Argument(..., help="A checkpoint, diffusers folder or latent .safetensors file."),
         json: bool = opt.Json):
    """What a checkpoint or latent file holds."""
    if file.suffix == ".safetensors" and file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file}: not a readable safetensors file: {e}") from None
        if "latent" in shapes and "format" in meta:
            result = {"kind": "latent", "tensors": shapes, "metadata": meta}
            return _show(file, result, json)
    sd = load_state_dict(file)
    c = infer_config(sd, str(file))
    result = {"kind": "autoencoder", "tensors": len(sd),
              "parameters": sum(v.numel() for v in sd.values()),
              "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
              "ch": c.ch, "ch_mult": list(c.ch_mult), "num_res_blocks": c.num_res_blocks,
              "latent_channels": c.latent_channels, "factor": c.factor, "quant_conv": c.use_quant_conv,
              "mid_attn": c.mid_attn, "attn_resolutions": list(c.attn_resolutions)}
    _show(file, result, json)


def _show(file, result, json):
    if json:
        output.json_line({"file": str(file), **result})
        return
    rows = []
    for k, v in result.items():
        if isinstance(v, dict):
            rows += [[f"{k}.{kk}", vv] for kk, vv in v.items()]
        else:
            rows.append([k, v])
    output.table(str(file), ["field", "value"], rows)
