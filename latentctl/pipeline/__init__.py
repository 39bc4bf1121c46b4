"""Datasets in, latents out (and back): discovery -> image loading -> batched model -> atomic writes.

    from latentctl import load
    from latentctl.pipeline import Options, encode_files, plan_encode
    vae, info = load(weights="vae.safetensors")
    summary = encode_files(vae, info, plan_encode(["imgs/"], "latents/"), Options(batch_size=8),
                           report=lambda record: ...)
"""

from .run import (Options, Record, Summary, decode_batch, decode_files, encode_batch, encode_files, plan_decode,
                  plan_encode, plan_roundtrip, roundtrip_files)

__all__ = ["Options", "Record", "Summary", "decode_batch", "decode_files", "encode_batch", "encode_files",
           "plan_decode", "plan_encode", "plan_roundtrip", "roundtrip_files"]
