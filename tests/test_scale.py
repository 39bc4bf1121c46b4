"""Scale-out: ranks (--shard, torchrun, SLURM), claims (two runs on one folder), progress (`latentctl status`),
the Ray engine. References: the single-process run of the same command (its latent bytes), and counts made here.
Every run says --dtype fp32: on a CPU with bf16 kernels `auto` is bf16, in which two batchings of the same images
differ by ~1e-2 (bf16's rounding, tests/test_bf16.py), and these tests compare engines, not precisions."""

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_main as cli
from latentctl import AEConfig, AutoencoderKL
from latentctl.cli.app import main
from latentctl.dist import ranks
from latentctl.dist.claims import Claims, claim_path
from latentctl.pipeline import plan_encode

ROOT = Path(__file__).resolve().parents[1]
N = 12  # images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    path = tmp_path_factory.mktemp("model") / "vae.safetensors"
    save_file(vae.state_dict(), path)
    # raw latents, said so: weights need a stated scale to be encoded with (issue 14)
    (path.parent / "config.json").write_text('{"scaling_factor": 1.0, "shift_factor": 0.0}')
    return path


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    """12 small images of three sizes in two folders."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N):
        size = [(24, 16), (16, 16), (32, 24)][i % 3]
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        (d / f"s{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(a).save(d / f"s{i % 2}" / f"{i:03d}.png")
    return d


@pytest.fixture(scope="module")
def single(imgs, tiny, tmp_path_factory) -> Path:
    """The reference: one process, default settings."""
    out = tmp_path_factory.mktemp("single")
    with pytest.raises(SystemExit) as exit_:
        main(["encode", str(imgs), "-o", str(out), "-w", str(tiny), "--dtype", "fp32", "-q"])
    assert exit_.value.code == 0
    return out




def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def outputs(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*.safetensors"))}


def same_latents(a: Path, b: Path, exact: bool = False) -> None:
    """The two folders hold the same files with the same metadata and latents within 1 fp16 ulp of the latent's
    largest value (exact: the same bytes). Other thread counts and batches round differently, hence the ulp."""
    fa, fb = outputs(a), outputs(b)
    assert sorted(fa) == sorted(fb) and fa
    for name in fa:
        (ma, ta), (mb, tb) = tensors(fa[name]), tensors(fb[name])
        assert ma == mb, name
        la, lb = ta["latent"].numpy(), tb["latent"].numpy()
        assert la.dtype == lb.dtype == np.float16 and la.shape == lb.shape
        if exact:
            assert la.tobytes() == lb.tobytes(), name
        else:
            ulp = float(np.spacing(np.abs(la).max()))
            assert np.abs(la.astype(np.float32) - lb.astype(np.float32)).max() <= ulp, name


def leftovers(folder: Path) -> list[str]:
    """Hidden files left in an output folder (claims, temp files) besides the progress records."""
    return sorted(p.name for p in folder.rglob(".*") if ".latentctl-progress" not in p.parts)


# --- ranks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("by", ranks.BY)
def test_split_is_a_deterministic_balanced_partition_for_any_n(by):
    rng = random.Random(1)
    for trial in range(200):
        items = [f"x{i}" for i in range(rng.randint(0, 60))]
        sizes = {x: rng.choice([0, 1, 10, 1000, rng.randint(1, 5000)]) for x in items}
        n = rng.randint(1, 9)
        parts = ranks.split(items, n, by=by, size=sizes.get)
        assert len(parts) == n
        assert parts == ranks.split(list(items), n, by=by, size=sizes.get)   # deterministic
        flat = [x for part in parts for x in part]
        assert sorted(flat) == sorted(items) and len(set(flat)) == len(items)  # disjoint, union is everything
        for part in parts:  # each part keeps the list's order
            assert part == [x for x in items if x in set(part)]
        if by == "count":
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        else:
            loads = [sum(sizes[x] for x in part) for part in parts]
            assert max(loads) - min(loads) <= max(sizes.values(), default=0)


def test_rank_from_flag_torchrun_and_slurm():
    assert ranks.current(None, {}) == ranks.Rank(0, 1, 0, "single")
    assert ranks.current(None, {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == ranks.Rank(3, 8, 1, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    assert ranks.current(None, slurm) == ranks.Rank(5, 6, 2, "slurm")
    assert ranks.current("1/4", slurm) == ranks.Rank(1, 4, 0, "flag")  # the flag wins
    assert ranks.device_for(ranks.Rank(5, 6, 2, "slurm"), "auto", 4) == "cuda:2"
    assert ranks.device_for(ranks.Rank(5, 6, 5, "slurm"), "auto", 4) == "cuda:1"
    assert ranks.device_for(ranks.Rank(5, 6, 2, "slurm"), "auto", 0) == "auto"   # no CUDA: as asked
    assert ranks.device_for(ranks.Rank(5, 6, 2, "slurm"), "cpu", 4) == "cpu"
    for bad in ("2/2", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            ranks.current(bad, {})


def test_slurm_ranks_and_shard_flag_split_the_run(imgs, tiny, single, tmp_path, capsys, monkeypatch):
    """Three SLURM tasks simulated in turn: each does its part, together everything once; --shard the same."""
    seen = []
    for k in range(3):
        code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "slurm", "-w", tiny, "--dtype", "fp32", "--json",
                             env={"SLURM_PROCID": str(k), "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"},
                             monkeypatch=monkeypatch)
        assert code == 0, err
        assert f"rank {k}/3: encode" in err
        rows = records(out)
        assert rows and all(r["status"] == "ok" for r in rows)
        seen += [r["input"] for r in rows]
    assert sorted(seen) == sorted(str(p) for p in imgs.rglob("*.png"))  # each once
    same_latents(single, tmp_path / "slurm")
    monkeypatch.delenv("SLURM_PROCID")
    for k in (1, 0):  # by count, the other rank first
        code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "flag", "-w", tiny, "--dtype", "fp32", "--json",
                             "--shard", f"{k}/2", "--shard-by", "count")
        assert code == 0 and len(records(out)) == N // 2
    same_latents(single, tmp_path / "flag")


def test_more_ranks_than_inputs_is_not_an_error(imgs, tiny, tmp_path, capsys):
    one = imgs / "s0" / "000.png"
    code, out, err = cli(capsys, "encode", one, "-o", tmp_path, "-w", tiny, "--dtype", "fp32", "--shard", "1/2",
                         "--json")
    assert code == 0 and records(out) == [] and "0 ok" in err


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_bytes(imgs, tiny, tmp_path):
    """`python -m torch.distributed.run --nproc-per-node 2 -m latentctl encode ...` (gloo world, CPU): each rank
    takes its part from RANK/WORLD_SIZE, together they write exactly the bytes of one process (same batch size and
    thread count, so the same rounding), each item once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["encode", str(imgs), "-w", str(tiny), "--dtype", "fp32", "--batch-size", "1", "--workers", "1", "--json"]
    ref = subprocess.run([sys.executable, "-m", "latentctl", *args, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr
    ranked = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "0", "-m", "latentctl", *args, "-o", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=240)
    assert ranked.returncode == 0, ranked.stderr
    assert "rank 0/2: encode:" in ranked.stderr and "rank 1/2: encode:" in ranked.stderr, ranked.stderr
    done = [r["output"] for r in records(ranked.stdout)]
    assert len(done) == N and len(set(done)) == N
    same_latents(tmp_path / "one", tmp_path / "two", exact=True)
    import pyarrow.parquet as pq  # both ranks merged their rows into one index (one at a time)
    rows = pq.read_table(tmp_path / "two" / "index.parquet").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(outputs(tmp_path / "one")) and {r["status"] for r in rows} == {"ok"}


# --- claims ----------------------------------------------------------------------------------------------------

def test_claim_is_exclusive_and_a_dead_runs_claim_expires(tmp_path):
    out = tmp_path / "a" / "x.safetensors"
    a, b = Claims(ttl=30), Claims(ttl=30)
    assert a.acquire(out) and not b.acquire(out) and b.busy(out)
    old = time.time() - 31
    os.utime(claim_path(out), (old, old))      # a stopped heartbeat
    assert not a.busy(out) and b.acquire(out)  # taken over
    assert not Claims(ttl=30).acquire(out)     # and held again
    b.release(out)
    assert not claim_path(out).exists()
    a.close(), b.close()


def test_heartbeat_keeps_a_live_claim(tmp_path):
    out = tmp_path / "x.safetensors"
    a = Claims(ttl=0.4)
    assert a.acquire(out)
    time.sleep(1.0)  # 2.5 ttl: only the heartbeat keeps it fresh
    assert not Claims(ttl=0.4).acquire(out)
    a.close()
    assert not claim_path(out).exists()


def test_item_held_by_a_live_run_is_skipped_once_that_run_writes_it(imgs, tiny, single, tmp_path, capsys):
    """Another run (simulated) holds one item's claim and writes it 1.5 s later: this run waits for it, reports it
    skipped, does everything else, exits 0. A dead run's claim (an hour old) is simply taken over."""
    ref, out = single, tmp_path / "out"
    held, dead = out / "s0" / "000.safetensors", out / "s1" / "001.safetensors"
    held.parent.mkdir(parents=True), dead.parent.mkdir(parents=True)
    other = Claims(ttl=30)
    assert other.acquire(held)
    claim_path(dead).write_text("dead:1\n")
    os.utime(claim_path(dead), (time.time() - 3600,) * 2)

    def other_run():
        time.sleep(1.5)
        held.write_bytes((ref / "s0" / "000.safetensors").read_bytes())
        other.release(held)
    t = threading.Thread(target=other_run)
    t.start()
    code, out_text, err = cli(capsys, "encode", imgs, "-o", out, "-w", tiny, "--dtype", "fp32", "--json")
    t.join()
    other.close()
    assert code == 0 and "error" not in err, err
    status = {r["output"]: r["status"] for r in records(out_text)}
    assert len(status) == N and status.pop(str(held)) == "skipped"
    assert set(status.values()) == {"ok"}
    same_latents(ref, out)
    assert leftovers(out) == []  # no claim or temp file left


@pytest.mark.slow
def test_two_concurrent_runs_split_the_work(imgs, tiny, single, tmp_path):
    """Two processes started together on one folder: both exit 0 with no error line, each output is encoded by
    exactly one of them (the other reports it skipped), and the folder equals a single run's."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "latentctl", "encode", str(imgs), "-o", str(out), "-w", str(tiny), "--dtype", "fp32",
           "--json", "--batch-size", "1", "--workers", "1"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [p.communicate(timeout=240) for p in runs]
    for p, (_, err) in zip(runs, results):
        assert p.returncode == 0 and "error" not in err, err
    ok = [r["output"] for o, _ in results for r in records(o) if r["status"] == "ok"]
    assert len(ok) == N and len(set(ok)) == N  # each output encoded once, by one of the two
    print("outputs encoded per run:", [sum(r["status"] == "ok" for r in records(o)) for o, _ in results])
    same_latents(single, out)
    assert leftovers(out) == []
    from latentctl.dist.progress import read, summarize
    job = summarize(read(out))  # the two runs' records count every item once
    assert (job.total, job.done, job.ok, job.ranks[0].runs) == (N, N, N, 2)


# --- progress across ranks -------------------------------------------------------------------------------------

def test_status_counts_a_job_of_ranks_reruns_and_concurrent_runs():
    from latentctl.dist.progress import RunProgress, summarize
    now = 1000.0

    def run(rank, ok, started, updated, skipped=0, by_others=0, failed=0, finished=False, total=50):
        return RunProgress(rank, 2, 100, total, ok=ok, skipped=skipped, by_others=by_others, failed=failed,
                           started=started, updated=updated, finished=finished)
    runs = [
        run(0, 20, 0, 400, failed=2),                 # rank 0 died at 400 s after 20 ok, 2 failed ...
        run(0, 10, 500, 990, skipped=20),             # ... rerun: found those 20, did 10 more in 490 s
        run(1, 15, 600, 990, failed=1),               # rank 1 and a second run sharing its part:
        run(1, 5, 800, 995, skipped=3, by_others=3),  # 3 of its skips were written by the first meanwhile
        RunProgress(0, 4, 999, 999, ok=999, started=0, updated=10, finished=True),  # another job: ignored
    ]
    job = summarize(runs, now)
    assert (job.world, job.total) == (2, 100)
    r0, r1 = job.ranks
    assert (r0.done, r0.ok, r0.failed, r0.runs, r0.state) == (30, 30, 0, 2, "running")  # 0 + 20 + 10; failures redone
    assert (r1.done, r1.failed) == (21, 1)                                              # 0 + 15 + 5 + 1
    assert job.done == 51
    assert job.rate == pytest.approx(10 / 490 + 15 / 390 + 5 / 195)
    assert job.eta == pytest.approx(49 / job.rate)
    job = summarize(runs, now + 100)  # nothing recorded for 100 s: stopped, no ETA
    assert {r.state for r in job.ranks} == {"stopped"} and job.rate == 0 and job.eta is None
    assert job.ranks[0].rate == pytest.approx(30 / (400 + 490))  # a rank not running: its average


def test_status_command_reads_the_ranks_progress(imgs, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "encode", imgs, "-o", out, "-w", tiny, "--dtype", "fp32", "--shard", "0/2", "-q")[0] == 0
    code, text, _ = cli(capsys, "status", out, "--json")
    job = json.loads(text)
    rank0 = len(ranks.select(plan_encode([str(imgs)], out), ranks.Rank(0, 2), "bytes"))  # what rank 0 was given
    assert code == 0 and (job["world"], job["total"], job["done"]) == (2, N, rank0)
    assert 0 < rank0 < N and job["eta"] is None and [r["state"] for r in job["ranks"]] == ["finished"]
    assert cli(capsys, "encode", imgs, "-o", out, "-w", tiny, "--dtype", "fp32", "--shard", "1/2", "-q")[0] == 0
    code, text, _ = cli(capsys, "status", out)
    assert code == 0 and f"job: {N}/{N} done (100.0%), 0 failed" in text and "ETA 0m00s" in text
    code, _, err = cli(capsys, "status", tmp_path)
    assert code == 2 and "no progress records" in err


# --- the Ray engine ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for the Ray tests of this module."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def ray_encode(imgs, tiny, out, report=None):
    from latentctl import load
    from latentctl.engines import ray as engine
    from latentctl.pipeline import Options
    vae, info = load(None, weights=str(tiny), device="cpu")
    items = plan_encode([str(imgs)], out)
    return engine.encode_files(vae, info, items, Options(workers=2), report=report)


@pytest.mark.slow
def test_ray_engine_writes_the_single_process_outputs(imgs, tiny, single, tmp_path, capsys, ray_cluster):
    """`encode --engine ray` (here on the module's local cluster): the single process's files, each item once,
    its progress in `status`; a rerun skips everything (the same resume rule)."""
    out = tmp_path / "out"
    code, text, err = cli(capsys, "encode", imgs, "-o", out, "-w", tiny, "--dtype", "fp32", "--engine", "ray", "--json")
    assert code == 0, err
    assert sorted(r["output"] for r in records(text) if r["status"] == "ok") == sorted(
        str(out / k) for k in outputs(single))
    same_latents(single, out)
    assert leftovers(out) == []
    code, text, _ = cli(capsys, "status", out, "--json")
    assert json.loads(text)["done"] == N
    import pyarrow.parquet as pq  # the index lists every latent, as the default engine's does
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(outputs(single)) and {r["status"] for r in rows} == {"ok"}
    assert all(r["shape"] and r["source_sha256"] for r in rows)
    summary = ray_encode(imgs, tiny, out)
    assert (summary.ok, summary.skipped) == (0, N)


def test_engine_flags_are_checked(imgs, tiny, tmp_path, capsys):
    code, _, err = cli(capsys, "encode", imgs, "-o", tmp_path, "-w", tiny, "--dtype", "fp32", "--engine", "spark")
    assert code == 2 and "--engine 'spark': choose threads, ray" in err
    code, _, err = cli(capsys, "encode", imgs, "-o", tmp_path, "-w", tiny, "--dtype", "fp32", "--ray-address", "auto")
    assert code == 2 and "--ray-address goes with --engine ray" in err


def _actor_pids() -> list[int]:
    """Processes of Ray Data's model actors (their title names the actor class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in title and "_Encoder" in title:
                pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_ray_actor_killed_mid_run_still_writes_every_output_once(imgs, tiny, single, tmp_path, ray_cluster):
    """SIGKILL of the model actor after its first results: Ray restarts it and retries its batch; the run ends
    with every item reported once, every output complete and equal to the single process's."""
    import signal
    killed = []

    def report(record):
        seen.append(record)
        if not killed:
            for pid in set(_actor_pids()) - before:  # this run's actor, not one of an earlier run still exiting
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, len(seen)))
    seen, before = [], set(_actor_pids())
    summary = ray_encode(imgs, tiny, tmp_path / "out", report)
    assert killed, "no actor process found to kill"
    assert len(seen) == N and killed[0][1] < N  # each item reported once, some of them after the kill
    assert (summary.ok, summary.failed) == (N, 0)
    assert sorted(r.output for r in seen) == sorted(str(tmp_path / "out" / k) for k in outputs(single))
    same_latents(single, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []
