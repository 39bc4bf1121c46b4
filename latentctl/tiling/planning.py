"""Planning: where to hold whole activations, where to stream tiles, spill or recompute, and the tile size."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .attention import ATTN_WHOLE, _attention_whole
from .ops import _Net
from .regions import _area, _requirements


@dataclass
class Segment:
    """Positions a..b of the layer list: a and b are held whole; between them tiles stream ("tiles"), or a
    global op runs on the held tensor ("global")."""

    a: int
    b: int
    kind: str
    tile: int = 0             # tile side in image pixels
    steps: int = 0            # tile passes: one per tile per GroupNorm inside, plus the final one
    memory: int = 0           # predicted bytes: held tensors at both ends + one tile's working set
    cost: float = 0.0         # multiply-adds, recomputation included
    room: int = 0             # global: bytes the op may use beyond its held input and output
    spilled: int = 0          # bytes of the held tensors that are in spill files


@dataclass
class TilePlan:
    """How one call runs: whether it tiles and, if so, the segments. Bytes for `estimate`, `budget`, `peak`."""

    what: str
    shape: tuple
    tile: bool
    mode: str
    estimate: int             # untiled peak activation bytes (estimate_memory)
    budget: int
    segments: list = field(default_factory=list)
    peak: int = 0             # predicted peak activation bytes when tiled
    cost_ratio: float = 1.0   # predicted compute / untiled compute
    fits: bool = True         # False: no cut fits the budget; the one needing least memory is used
    spill_over: int | None = None   # held tensors over this many bytes live in spill files (None: none)
    spill_dir: str = ""

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def describe(self) -> str:
        head = f"{self.what} {'x'.join(map(str, self.shape))}"
        if not self.tile:
            rel = "<=" if self.estimate <= self.budget else ">"
            return f"{head}: untiled (needs ~{_gb(self.estimate)} {rel} budget {_gb(self.budget)}; --tile {self.mode})"
        tiles = sorted({s.tile for s in self.segments if s.kind == "tiles"})
        over = "" if self.fits else " (OVER BUDGET: no cut fits; smallest used)"
        disk = max((s.spilled for s in self.segments), default=0)
        spill = f", up to {_gb(disk)} spilled to {self.spill_dir}" if disk else ""
        return (f"{head}: tiled, {len(self.segments)} segments, tiles {'/'.join(map(str, tiles))} px, "
                f"~{_gb(self.peak)} of budget {_gb(self.budget)}{over} (untiled ~{_gb(self.estimate)}){spill}, "
                f"compute {self.cost_ratio:.2f}x untiled")


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


TILE_SIDES = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8)
SPILL_WORTH = 0.8   # spill files are used only when they cut the planned computation by at least a fifth
WORKSPACE = 2.0     # a conv's input and output tiles count this many times: oneDNN reorders, allocator slack


def _side(net: _Net, p: int, tile_px: int, image_hw: tuple) -> int:
    """Tile side at position p for tiles of tile_px image pixels."""
    return max(1, round(tile_px * net.size(p)[0] / image_hw[0]))


def _tile_grid(h: int, w: int, side: int) -> list:
    """Tile cores of at most about side x side covering h x w, edges on multiples of 8 (or of side's largest
    power-of-two divisor below 8) so they fall on whole latent pixels."""
    align = 1
    while align < 8 and side % (2 * align) == 0:
        align *= 2

    def cuts(n):
        k = max(1, math.ceil(n / side))
        edges = sorted({min(n, round(i * n / k / align) * align) for i in range(1, k)} | {0, n})
        return list(zip(edges, edges[1:]))
    return [(y0, y1, x0, x1) for y0, y1 in cuts(h) for x0, x1 in cuts(w)]


def _grid(net: _Net, p: int, tile_px: int, image_hw: tuple) -> list:
    return _tile_grid(*net.size(p), _side(net, p, tile_px, image_hw))


def _tile_bytes(net: _Net, a: int, t: int, tile_px: int, image_hw: tuple) -> int:
    """Working set of one interior tile streamed from a to t: the tensors alive at its most demanding op."""
    h, w = net.size(t)
    side = _side(net, t, tile_px, image_hw)
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    req = _requirements(net, a, t, (y0, min(y0 + side, h), x0, min(x0 + side, w)), True)
    peak, skips = 0.0, []
    for i in range(a, t):
        here = _area(req[i]) * net.shape[i][0] + _area(req[i + 1]) * net.shape[i + 1][0]
        peak = max(peak, sum(skips) + WORKSPACE * here)
        if net.ops[i].kind == "push":
            skips.append(_area(req[i]) * net.shape[i][0])
        elif net.ops[i].kind == "add" and skips:
            skips.pop()
    return int(peak * net.batch * net.esize)


def _pass_cost(net: _Net, a: int, t: int, tile_px: int, image_hw: tuple, keep_skips: bool) -> float:
    """Multiply-adds of one pass a -> t over all tiles, halos included (every tile costed as an interior one)."""
    grid = _grid(net, t, tile_px, image_hw)
    if len(grid) == 1:
        return sum(net.op_cost(i) for i in range(a, t))
    y0, y1, x0, x1 = max(grid, key=_area)
    h, w = net.size(t)
    cy, cx = (h - (y1 - y0)) // 2, (w - (x1 - x0)) // 2     # the largest tile, moved to the middle
    req = _requirements(net, a, t, (cy, cy + y1 - y0, cx, cx + x1 - x0), keep_skips)
    per_tile = 0.0
    for i in range(a, t):
        hi, wi = net.size(i + 1)
        per_tile += net.op_cost(i) * _area(req[i + 1]) / (hi * wi)
    return per_tile * len(grid)


def _untiled_peak(net: _Net) -> int:
    """Peak activation bytes of the plain forward: the input, residuals waiting, each op's input, outputs and
    temporaries."""
    peak = 0.0
    for i, op in enumerate(net.ops):
        (c, h, w), (c2, h2, w2) = net.shape[i], net.shape[i + 1]
        x, y = c * h * w, c2 * h2 * w2
        waiting = net.state_bytes(i) / (net.batch * net.esize) - x
        if op.kind == "norm":
            here = x + 2 * y                     # input, GroupNorm output, SiLU output
        elif op.kind == "attn":
            here = ATTN_WHOLE * x
        elif op.kind == "add":
            here = x + 3 * y                     # branch, residual, shortcut(residual), sum
        elif op.kind in ("conv", "down"):
            here = WORKSPACE * (x + y)
        else:
            here = x + y
        peak = max(peak, waiting + here)
    c0, h0, w0 = net.shape[0]
    return int((peak + c0 * h0 * w0) * net.batch * net.esize)


# What a byte written to / read from a spill file costs, in multiply-adds of computation (planning only).
# Measured on a 2-core CPU: convolutions ~50 G multiply-adds/s; writes ~0.3 GB/s (they reach the disk), reads of
# recently written data ~1 GB/s.
SPILL_WRITE_MACS = 160.0
SPILL_READ_MACS = 50.0


def _spill_io(read: int, written: int, passes: int) -> float:
    """Spill I/O of a segment as multiply-adds: the held tensors read once per pass, the new ones written once."""
    return SPILL_READ_MACS * read * passes + SPILL_WRITE_MACS * written


def _on_disk(net: _Net, p: int, j: int | None, over: int | None) -> bool:
    """Whether a held tensor is spilled to disk when tensors over `over` bytes are (None: none are): the running
    tensor at position p (j None) or the residual pushed at op j. Never the input, the output, or a global
    op's input or output (attention needs them whole in memory)."""
    if over is None:
        return False
    if j is not None:
        return net.shape_bytes(j) > over
    if p == 0 or p == net.n or net.ops[p].kind == "attn" or net.ops[p - 1].kind == "attn":
        return False
    return net.shape_bytes(p) > over


def _plan_segments(net: _Net, budget: int, tile_px: int | None, image_hw: tuple, over: int | None = None,
                   disk: int = 0) -> tuple[list, float, bool]:
    """The cut of positions 0..n into held positions and segments with the least computation whose every
    segment fits the budget (dynamic programming); if none fits, the cut whose largest segment needs least.
    Held tensors over `over` bytes live in spill files (their writes and reads priced as computation), at most
    `disk` bytes at a time. Returns (segments, compute / untiled compute, fits)."""
    n = net.n
    cost = [net.op_cost(i) for i in range(n)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    norms = [i for i, op in enumerate(net.ops) if op.kind == "norm"]
    glob = [i for i, op in enumerate(net.ops) if op.kind == "attn"]
    probe = tile_px or 64           # memory of a segment is judged with tiles of this size
    inp = net.state_bytes(0)
    tile_bytes = net.cache.setdefault(("tile_bytes", probe), {})

    def ends(a, b):
        """(memory, disk, bytes read per pass, bytes written) of the tensors held while streaming a -> b: both
        ends (residuals they share counted once) and the input."""
        mem, spilled, read, written = (inp if a > 0 else 0), 0, 0, 0
        for p, j in [(a, None), (b, None)] + [(a, j) for j in sorted(set(net.alive[a]) | set(net.alive[b]))]:
            nbytes = net.shape_bytes(p if j is None else j)
            if not _on_disk(net, p, j, over):
                mem += nbytes
                continue
            spilled += nbytes
            if p == a and (j is None or j in net.alive[a]):
                read += nbytes
            else:
                written += nbytes
        return mem, spilled, read, written

    def held(a, b):
        return ends(a, b)[0]

    memo = {}

    def segment(a, b):
        """(compute, memory) of a -> b as one segment, or None if it cannot be one."""
        if (a, b) not in memo:
            if any(a <= g < b for g in glob):
                memo[a, b] = None
                if b == a + 1:       # attention on the held tensor: whole, or query chunks (+ K, V, a chunk)
                    x, room = net.shape_bytes(a), budget - held(a, b)
                    extra = (ATTN_WHOLE - 2) * x if _attention_whole(x, room) else 2 * x + x // 8
                    memo[a, b] = cost[a], held(a, b) + extra
            else:
                inside = [k for k in norms if a < k < b]
                mem, spilled, read, written = ends(a, b)
                io = _spill_io(read, written, len(inside) + 1)
                write = 4.0 * net.state_bytes(b) / net.esize   # among equal computations, hold less
                compute = sum(prefix[k] - prefix[a] for k in inside) + prefix[b] - prefix[a] + write + io
                if (a, b) not in tile_bytes:
                    tile_bytes[a, b] = _tile_bytes(net, a, b, probe, image_hw)
                memo[a, b] = (compute, mem + tile_bytes[a, b]) if spilled <= disk else (math.inf, math.inf)
        return memo[a, b]

    def cheapest(limit):
        """best[b] = (compute, previous cut) of the cheapest cut of 0..b whose segments all fit `limit`."""
        best = [(math.inf, 0)] * (n + 1)
        best[0] = (0.0, 0)
        for b in range(1, n + 1):
            for a in range(b - 1, -1, -1):
                seg = segment(a, b)
                if seg is None:
                    break           # a global op lies in a..b: so it does for every smaller a
                if seg[1] <= limit and best[a][0] + seg[0] < best[b][0]:
                    best[b] = (best[a][0] + seg[0], a)
        return best

    best = cheapest(budget)
    fits = best[n][0] < math.inf
    if not fits:   # the least memory any cut needs (its largest segment), then the cheapest cut within it
        floor = [0.0] + [math.inf] * n
        for b in range(1, n + 1):
            for a in range(b - 1, -1, -1):
                seg = segment(a, b)
                if seg is None:
                    break
                floor[b] = min(floor[b], max(floor[a], seg[1]))
        if floor[n] == math.inf:
            return [], math.inf, False
        budget = int(floor[n])
        best = cheapest(budget)
    cuts, b = [], n
    while b:
        a = best[b][1]
        cuts.append((a, b))
        b = a
    segments = []
    for a, b in reversed(cuts):
        c, mem = segment(a, b)
        if net.ops[a].kind == "attn":
            segments.append(Segment(a, b, "global", 0, 1, mem, c, room=budget - held(a, b)))
            continue
        mem, spilled, read, written = ends(a, b)
        tile = tile_px or _pick_tile(net, a, b, image_hw, budget - mem)
        inside = [k for k in norms if a < k < b]
        steps = sum(len(_grid(net, k, tile, image_hw)) for k in inside) + len(_grid(net, b, tile, image_hw))
        c = sum(_pass_cost(net, a, k, tile, image_hw, False) for k in inside)
        c += _pass_cost(net, a, b, tile, image_hw, True)
        c += _spill_io(read, written, len(inside) + 1)
        segments.append(Segment(a, b, "tiles", tile, steps, mem + _tile_bytes(net, a, b, tile, image_hw), c,
                                spilled=spilled))
    return segments, sum(s.cost for s in segments) / (prefix[-1] or 1.0), fits


def _pick_tile(net: _Net, a: int, b: int, image_hw: tuple, room: int) -> int:
    """The largest tile (image pixels) whose working set fits `room`: the whole image if it does."""
    whole = max(image_hw)
    for t in (whole,) + tuple(s for s in TILE_SIDES if s < whole):
        if _tile_bytes(net, a, b, t, image_hw) <= room:
            return t
    return TILE_SIDES[-1]
