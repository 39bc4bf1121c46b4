"""Running a plan: segments streamed tile by tile, statistics passes, held and spilled tensors."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import UsageError
from ..modules.autoencoder import AutoencoderKL
from ..spill import SpilledTensor
from .attention import _global_attention
from .budget import _net
from .ops import _Net
from .planning import Segment, TilePlan, _grid, _on_disk
from .regions import _apply_op, _conv_region, _crop, _requirements
from .stats import GroupStats


class _State:
    """A held position: the running tensor and the residuals waiting on the stack ({key: tensor}), whole."""

    def __init__(self, running: torch.Tensor, skips: dict):
        self.running, self.skips = running, skips


class _Runner:
    """Runs a plan's segments, keeping each GroupNorm's statistics once known."""

    def __init__(self, net: _Net, image_hw: tuple, budget: int, progress=None, total: int = 0,
                 spill_over: int | None = None, spill_dir: str = ""):
        self.net, self.image_hw, self.budget = net, image_hw, budget
        self.spill_over, self.spill_dir = spill_over, spill_dir
        self.progress, self.total, self.done = progress, total, 0
        self.stats: dict[int, GroupStats] = {}

    def tick(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def run_tile(self, state: _State, a: int, t: int, core, keep_skips: bool, into: GroupStats | None = None):
        """Region `core` of position t computed from the held state at a; with `into`, only its statistics are
        accumulated there. Returns (running tensor on core, {key: residual on core} for those made after a)."""
        net = self.net
        req = _requirements(net, a, t, core, keep_skips)
        have = req[a]
        ha, wa = net.size(a)
        cur = _crop(state.running, (0, ha, 0, wa), have)
        stack = []
        for j in net.alive[a]:
            _, hj, wj = net.shape[j]
            stack.append((state.skips[j], (0, hj, 0, wj)))
        for i in range(a, t):
            op, out_r = net.ops[i], req[i + 1]
            h, w = net.size(i)
            if op.kind == "push":
                stack.append((cur, have))
                cur = _crop(cur, have, out_r)
            elif op.kind == "add":
                s, s_have = stack.pop()
                sc = _crop(s, s_have, out_r) if op.module is None else \
                    _conv_region(op.module, op.pad, s, s_have, out_r, h, w)
                cur = _crop(cur, have, out_r) + sc
            else:
                cur = _apply_op(op, cur, have, out_r, h, w, self.stats.get(i))
            have = out_r
        if into is not None:
            into.add(cur)
            return None, {}
        new = {j: _crop(s, s_have, core) for j, (s, s_have) in zip(net.alive[t], stack) if j >= a} \
            if keep_skips else {}
        return cur, new

    def stats_pass(self, state: _State, a: int, k: int, tile_px: int) -> GroupStats:
        """The statistics of the GroupNorm at position k: every tile core of k streamed from a, sums kept."""
        acc = GroupStats(self.net.ops[k].module, self.net.batch, state.running.device)
        for core in _grid(self.net, k, tile_px, self.image_hw):
            self.run_tile(state, a, k, core, False, acc)
            self.tick()
        return acc

    def _hold(self, p: int, j: int | None, like: torch.Tensor):
        """An empty whole tensor for position p's running tensor (j None) or residual j: in memory, or in a spill
        file when the plan says so."""
        c, h, w = self.net.shape[p if j is None else j]
        shape = (self.net.batch, c, h, w)
        if _on_disk(self.net, p, j, self.spill_over):
            return SpilledTensor(shape, like.dtype, like.device, self.spill_dir)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def final_pass(self, state: _State, a: int, b: int, tile_px: int) -> _State:
        """The held state at b, tile by tile from the held state at a (with the statistics of a GroupNorm at b,
        summed from the same tiles)."""
        net = self.net
        grid = _grid(net, b, tile_px, self.image_hw)
        kept = {j: state.skips[j] for j in net.alive[b] if j < a}   # residuals held since before a
        new_keys = [j for j in net.alive[b] if j >= a]
        norm = net.ops[b].module if b < net.n and net.ops[b].kind == "norm" and b not in self.stats else None
        acc = GroupStats(norm, net.batch, None) if norm is not None else None
        spills = any(_on_disk(net, b, j, self.spill_over) for j in [None] + new_keys)
        if len(grid) == 1 and not spills:   # one tile is the whole image: keep its tensors as they come, no copies
            out, new = self.run_tile(state, a, b, grid[0], True)
            if acc is not None:
                self.stats[b] = acc.add(out)
            self.tick()
            return _State(out, {**kept, **new})
        running, new_skips = None, {}
        for core in grid:
            out, new = self.run_tile(state, a, b, core, True)
            if running is None:    # dtypes from the first tile: under autocast they are not the input's
                running = self._hold(b, None, out)
                new_skips = {j: self._hold(b, j, t) for j, t in new.items()}
            running[:, :, core[0]:core[1], core[2]:core[3]] = out
            for j, t in new.items():
                new_skips[j][:, :, core[0]:core[1], core[2]:core[3]] = t
            if acc is not None:
                acc.add(out)
            del out, new
            self.tick()
        if acc is not None:
            self.stats[b] = acc
        return _State(running, {**kept, **new_skips})

    def segment(self, state: _State, seg: Segment) -> _State:
        net, a, b = self.net, seg.a, seg.b
        if seg.kind == "global":    # its input is never spilled (_on_disk)
            out = _global_attention(net.ops[a].module, state.running, seg.room)
            self.tick()
            return _State(out, state.skips)
        if net.ops[a].kind == "norm" and a not in self.stats:
            self.stats[a] = GroupStats.of(net.ops[a].module, state.running)
        for k in range(a + 1, b):  # each GroupNorm inside, with every earlier statistic already exact
            if net.ops[k].kind == "norm":
                self.stats[k] = self.stats_pass(state, a, k, seg.tile)
        return self.final_pass(state, a, b, seg.tile)

def _execute(vae: AutoencoderKL, x: torch.Tensor, what: str, tile_plan: TilePlan, progress, report) -> torch.Tensor:
    if tuple(x.shape) != tuple(tile_plan.shape) or tile_plan.what != what:
        raise UsageError(f"tiling: the plan is for {tile_plan.what} {tile_plan.shape}, not {what} {tuple(x.shape)}")
    if not tile_plan.segments:
        raise UsageError("tiling: this plan does not tile (plan(..., mode='on') makes one that does)")
    if vae.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in vae.modules()):
        raise UsageError("tiling: inference only, and this model would apply dropout: call vae.eval()")
    start = time.perf_counter()
    net = _net(vae, x.shape, what, None)
    image_hw = net.size(0) if what == "encode" else net.size(net.n)
    runner = _Runner(net, image_hw, tile_plan.budget, progress, tile_plan.steps, tile_plan.spill_over,
                     tile_plan.spill_dir)
    state = _State(x, {})
    for seg in tile_plan.segments:
        state = runner.segment(state, seg)
    if report is not None:
        report.update(plan=tile_plan.describe(), tiled=True, steps=runner.done,
                      seconds=time.perf_counter() - start)
    return state.running
