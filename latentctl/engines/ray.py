"""`encode --engine ray`: the same steps as pipeline/run.py (load -> encode -> write), as a Ray Data pipeline.

    items (driver: resume rule, skipped / refused records)
      -> read + decode each image            Ray tasks on CPUs           run.encode_steps(...).load
      -> encode, batched by size, and write  an actor pool (map_batches  .compute, then .finish: the same
                                             with a callable class; one  atomic writer and metadata)
                                             GPU per actor on GPU nodes)
      -> one Record per item                 streamed back to the driver, reported as they come

Memory is bounded by Ray Data's streaming executor (a few blocks in flight per stage, never the dataset).
A lost actor or worker (killed, node gone) is restarted and its batch retried by Ray (actors are restartable and
their tasks retried by default); an item whose output a lost attempt already wrote is found complete by the same
resume check and not written again, so every output is written once and every item reported once.
Without --ray-address a local cluster is started (no dashboard) and stopped at the end.
"""

import os
import pickle
import time

import numpy as np
import torch

from ..errors import UsageError
from ..pipeline import run
from ..pipeline.inputs import resume_one
from ..pipeline.sinks import FileSink


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'latentctl[ray]'") from None
    return ray


def check_installed() -> None:
    """A UsageError now, before any work, when Ray Data is not installed."""
    _ray()


def _read(batch: dict, *, factor: int, options: run.Options, seed) -> dict:
    """Ray task: each item -> its loaded job (image decoded, prepared) or its error Record, pickled."""
    load = run.image_loader(factor, options, seed)
    out = [pickle.dumps(run.load_item(load, pickle.loads(blob)), protocol=5) for blob in batch["item"]]
    return {"i": batch["i"], "job": np.array(out, dtype=object)}


class _Encoder:
    """Ray actor: holds the model; encodes a batch of loaded jobs (grouped by size) and writes their latents."""

    def __init__(self, vae_ref, info, options: run.Options, seed, threads: int):
        import ray

        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        vae = ray.get(vae_ref[0]).to(self.device)
        self.options = options
        self.steps = run.encode_steps(vae, info, options, FileSink(None), seed=seed)

    def __call__(self, batch: dict) -> dict:
        jobs = [pickle.loads(blob) for blob in batch["job"]]
        records = [None] * len(jobs)
        groups: dict = {}
        for n, job in enumerate(jobs):
            if isinstance(job, run.Record):
                records[n] = job
            elif not self.options.overwrite and self.steps.check(job.item)[0] == "done":
                # written by an attempt of this run that was lost after the write (the driver skipped older ones)
                records[n] = run.Record(job.item.source, str(job.item.output), "ok", item=job.item)
            else:
                groups.setdefault(job.key, []).append(n)
        for members in groups.values():
            group = [jobs[n] for n in members]
            t = time.perf_counter()
            results = run.compute_items(self.steps.compute, group)
            share = (time.perf_counter() - t) / len(group)
            for n, job, result in zip(members, group, results):
                job.seconds += share
                records[n] = run.item_error(job, result) if isinstance(result, Exception) else \
                    run.finish_item(self.steps.finish, job, result)
        return {"i": batch["i"], "record": np.array([pickle.dumps(r) for r in records], dtype=object)}


def encode_files(vae, info, items, options: run.Options, *, report=None, warn=None, stop=None, sink=None,
                 address: str | None = None, actors: int | None = None, num_cpus: int | None = None) -> run.Summary:
    """pipeline.run.encode_files, run on Ray. address: an existing cluster ("auto", "ray://host:10001", ...);
    None starts a local one with num_cpus (default: this machine's). actors: model replicas (default: one per
    GPU of the cluster, else one). sink: the CLI's FileSink of OUT; its index.parquet gets a row per item (read
    back from each written header) and is merged at the end. Latent files only (not tar shards)."""
    ray = _ray()
    started = time.perf_counter()
    warn = warn or (lambda message: None)
    steps = run.encode_steps(vae, info, options, FileSink(None), warn=warn)  # the driver's: resume rule, seed
    summary = run.Summary(total=len(items), seed=steps.seed)

    def emit(record: run.Record) -> None:
        if sink is not None:
            if record.status == "ok" and record.item is not None:
                sink.written(record.item)  # the actor wrote it, in another process
            else:
                sink.record(record)
        summary.ok += record.status == "ok"
        summary.skipped += record.status == "skipped"
        summary.failed += record.status == "error"
        if report is not None:
            report(record)

    todo = []
    for item in items:
        state, reason = resume_one(item, options.overwrite, steps.check)
        if state == "done":
            emit(run.Record(item.source, str(item.output), "skipped", item=item))
        elif state == "conflict":
            emit(run.item_error(item, reason))
        else:
            todo.append(item)
    own = not ray.is_initialized()
    if own and todo:
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address is None:
            kwargs |= dict(num_cpus=num_cpus or os.cpu_count() or 1)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise UsageError(f"--ray-address {address}: cannot join that Ray cluster: {e}") from None
    try:
        if todo:
            _run(ray, vae, info, todo, options, steps.seed, actors, emit, stop)
    finally:
        if own and ray.is_initialized():
            ray.shutdown()
        if sink is not None:
            sink.close(stop is not None and stop.is_set())
    summary.interrupted = stop is not None and stop.is_set() and \
        summary.ok + summary.skipped + summary.failed < summary.total
    summary.seconds = time.perf_counter() - started
    return summary


def _run(ray, vae, info, todo, options, seed, actors, emit, stop) -> None:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = actors or max(1, gpus)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    vae_ref = [ray.put(vae.cpu() if gpus else vae)]  # in a list: Ray would resolve a bare ref to the module itself
    rows = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(todo)]
    blocks = max(1, min(len(rows), len(rows) // max(1, options.batch_size)))
    per_actor = dict(num_gpus=1) if gpus else dict(num_cpus=1)
    ds = (ray.data.from_items(rows, override_num_blocks=blocks)
          .map_batches(_read, fn_kwargs=dict(factor=vae.config.factor, options=options, seed=seed),
                       batch_size=options.batch_size, num_cpus=1)
          .map_batches(_Encoder, fn_constructor_kwargs=dict(vae_ref=vae_ref, info=info, options=options,
                                                            seed=seed, threads=torch.get_num_threads()),
                       batch_size=options.batch_size, concurrency=actors, **per_actor))
    seen = set()
    for row in ds.iter_rows():
        i = int(row["i"])
        if i not in seen:  # each item is reported once, whatever Ray retried
            seen.add(i)
            emit(pickle.loads(row["record"]))
        if stop is not None and stop.is_set():
            return
    for i, item in enumerate(todo):  # never silent: an item Ray did not give back is an error
        if i not in seen:
            emit(run.item_error(item, "lost by the Ray pipeline (no result came back); rerun to do it"))
