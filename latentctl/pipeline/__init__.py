"""Datasets in, latents out (and back): discovery -> image loading -> batched model -> atomic writes.

    from latentctl import load
    from latentctl.pipeline import Options, encode_files, plan_encode
    vae, info = load(weights="vae.safetensors")
    summary = encode_files(vae, info, plan_encode(["imgs/"], "latents/"), Options(batch_size=8),
                           report=lambda record: ...)   # images and clips (.mp4, animated .gif, ...) alike
"""

from .frames import Selection
from .media import decode_files, encode_files, plan_decode, plan_encode, plan_roundtrip, roundtrip_files
from .run import Options, Record, Summary, decode_batch, encode_batch

__all__ = ["Options", "Record", "Selection", "Summary", "decode_batch", "decode_files", "encode_batch", "encode_files",
           "plan_decode", "plan_encode", "plan_roundtrip", "roundtrip_files"]
