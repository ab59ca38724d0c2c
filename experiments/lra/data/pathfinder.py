"""Pathfinder / Path-X image generator, numpy + pillow only (the task: docs/lra.md#pathfinder-generator).

An image holds two target snakes of `contour_length` dashes ("paddles") whose start tips are
`seed_distance` apart (the first in the central square `2 * seed_distance` from every edge), plus
distractor snakes of `contour_length // 3` dashes. One margin `m` is drawn per image from `margins`.
The two targets grow side by side, a dash each in turn. Each dash starts `m` past the end (the
pivot) of the previous one and ends on the circle of radius `paddle_length + m` around it; its
direction is drawn with weight `(1 - occupied) * max(cos(min(|turn| * continuity, pi/2)), 0)^2`
over a fan of candidate turns, where `occupied` tests the dash and the gap before it against a
mask of every earlier dash widened by `thickness/2 + m` (a snake's latest dash joins the mask only
once the next one is placed, so the gap is allowed). Two markers are drawn on snake tips: label 1
puts them on both ends of one target snake, label 0 on the start of one target and the far end of
the other. Both classes contain the same kind of content, so the label is right by construction;
`Geometry` records what was drawn. The original generator leaves `2 m` between consecutive dashes;
with that spacing two 14-dash targets almost never fit the canvas, so this one leaves `m`
(docs/lra.md#pathfinder-generator lists this and the other departures).

Intensities: a target dash is drawn at `snake contrast * paddle contrast`, a distractor dash at the
snake contrast, markers at 1; the image is then scaled so its brightest pixel is 255. Drawing is
anti-aliased by rendering at `supersample` x resolution and box-downsampling.

`preset(resolution)` holds the per-resolution settings the LRA data was documented with; `python -m
experiments.lra.data.pathfinder --out DIR` writes a sample sheet per resolution.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

N_TURNS = 33          # candidate turn angles per dash, evenly spaced over (-pi, pi)
MAX_ATTEMPTS = 20000  # whole-image restarts before giving up (64 px needs about 100 on average)
OCC_SCALE = 2         # occupancy cells per pixel
DISTRACTOR_TRIES = 5  # attempts per distractor snake before it is left out (the original's 1 + 4 retrials)


@dataclass(frozen=True)
class PathfinderConfig:
    """Drawing parameters; lengths are in output pixels (`preset` holds the documented ones).

    margins: one margin is drawn per image from this tuple. snake_contrasts / paddle_contrasts:
    intensity factors (see the module docstring). distractor_budget: the number of distractor
    dashes, divided by the distractor length (integer division) to give the number of distractor
    snakes; `n_distractors` overrides that count.
    """
    resolution: int = 32
    contour_length: int = 14
    paddle_length: float = 2.0
    thickness: float = 0.5
    supersample: int = 2
    margins: tuple = (1.0,)
    marker_radius: float = 1.5
    seed_distance: float = 7.0
    continuity: float = 1.0
    padding: float = 1.0
    snake_contrasts: tuple = (2.0,)
    paddle_contrasts: tuple = (0.75,)
    distractor_budget: int = 20
    n_distractors: int | None = None

    @property
    def distractor_length(self) -> int:
        """Dashes per distractor snake: `contour_length // 3`."""
        return max(self.contour_length // 3, 1)

    @property
    def distractors(self) -> int:
        """Distractor snakes per image: `distractor_budget // distractor_length` unless overridden."""
        if self.n_distractors is not None:
            return self.n_distractors
        return self.distractor_budget // self.distractor_length


# Per-resolution settings documented for the LRA release (google-research/long-range-arena,
# lra_benchmarks/data/pathfinder.py, the Pathfinder32/64/128 builder docstrings), which list what was
# changed from the defaults of the drewlinsley/pathfinder generator (snakes2_wrapper.py: paddle
# length 5, paddle contrast 1.0). Where a docstring assigns a setting twice (antialias 4, then 2)
# the later value is the one that took effect. Distractor counts: the generator is Python 2 code,
# so `contour_length / 3` is 14 // 3 = 4 and the count is budget // 4 = 5 (32 px), 5 (64 px) and
# 8 (128 px); 128 px also reads as 35 / (14 / 3) = 7.5, which the generator's `while i < n` loop
# rounds up to the same 8. Released data that is known to differ from these documented values
# would take precedence; a report of about twice as many distractors in the released Path-X could
# not be checked here, so the documented 8 stands (`n_distractors` overrides it).
_PRESETS = {
    32: dict(paddle_length=2.0, thickness=0.5, supersample=2, margins=(1.0,), marker_radius=1.5,
             seed_distance=7.0, continuity=1.0, padding=1.0, snake_contrasts=(2.0,),
             paddle_contrasts=(0.75,), distractor_budget=20),
    64: dict(paddle_length=5.0, thickness=1.0, supersample=2, margins=(1.0,), marker_radius=2.5,
             seed_distance=12.0, continuity=1.8, padding=1.0, snake_contrasts=(0.8,),
             paddle_contrasts=(1.0,), distractor_budget=22),
    128: dict(paddle_length=5.0, thickness=1.5, supersample=2, margins=(2.0, 3.0), marker_radius=3.0,
              seed_distance=20.0, continuity=1.8, padding=1.0, snake_contrasts=(0.9,),
              paddle_contrasts=(1.0,), distractor_budget=35),
}


def preset(resolution: int, contour_length: int = 14) -> PathfinderConfig:
    """The documented LRA settings for 32, 64 and 128 px (Path-X) at difficulty `contour_length`."""
    if resolution not in _PRESETS:
        raise ValueError(f"resolution must be one of {sorted(_PRESETS)}, got {resolution}")
    if contour_length not in (6, 9, 14):
        raise ValueError(f"contour_length must be 6, 9 or 14, got {contour_length}")
    return PathfinderConfig(resolution=resolution, contour_length=contour_length, **_PRESETS[resolution])


@dataclass
class Geometry:
    """What was drawn. Points are (x, y) in pixels, pixel i covering [i, i+1).

    snakes[0] and snakes[1] are the targets (snakes[0] carries marker 0 on its start tip),
    the rest distractors; each snake is (n_dashes, 2, 2): per dash its (start, end) point, and
    intensities[i] (n_dashes,) the brightness factor of each dash. markers (2, 2) are marker
    centres; marker_ends[i] = (snake index, 0 for start / 1 for end). margin: this image's margin.
    """
    label: int
    margin: float = 0.0
    snakes: list[np.ndarray] = field(default_factory=list)
    intensities: list[np.ndarray] = field(default_factory=list)
    markers: np.ndarray | None = None
    marker_ends: tuple = ()


class _Canvas:
    """Occupancy mask plus the dash-placement rule, for one image's margin."""

    def __init__(self, cfg: PathfinderConfig, rng: np.random.Generator, margin: float):
        self.cfg, self.rng, self.margin = cfg, rng, margin
        g = cfg.resolution * OCC_SCALE
        self.mask = np.zeros((g, g), dtype=bool)  # (G, G) True = taken
        # A dash keeps thickness/2 + margin from every stamped dash and stays off the padding band.
        self.reach = cfg.thickness / 2 + margin
        self.border = cfg.padding + cfg.thickness / 2
        cells = (np.arange(g) + 0.5) / OCC_SCALE
        self.cx, self.cy = cells[None, :], cells[:, None]  # cell centres, (1, G) and (G, 1)
        n = max(int(np.ceil((cfg.paddle_length + margin) * OCC_SCALE)) + 1, 2)
        self.t = np.linspace(0.0, 1.0, n)[:, None]  # (P, 1) sample spacing below one cell
        self.turns = np.linspace(-np.pi, np.pi, N_TURNS, endpoint=False) + np.pi / N_TURNS  # (T,)

    def _free(self, pts: np.ndarray) -> np.ndarray:
        """pts (..., P, 2) -> (...,) True where every point is inside the drawable area and untaken."""
        lo, hi = self.border, self.cfg.resolution - self.border
        inside = ((pts >= lo) & (pts <= hi)).all(-1)  # (..., P)
        idx = np.clip((pts * OCC_SCALE).astype(int), 0, self.mask.shape[0] - 1)
        return (inside & ~self.mask[idx[..., 1], idx[..., 0]]).all(-1)

    def stamp(self, dash: np.ndarray) -> None:
        """Mark every cell within reach (thickness/2 + margin) of the dash (start, end) as taken."""
        r = self.reach
        (x0, x1), (y0, y1) = _window(dash, r, OCC_SCALE, self.mask.shape[0])
        d = _segment_distance(self.cx[:, x0:x1], self.cy[y0:y1], dash[0], dash[1])  # (h, w)
        self.mask[y0:y1, x0:x1] |= d <= r

    def stamp_disk(self, centre: np.ndarray, r: float) -> None:
        """Mark every cell within r of `centre` (keeps distractors out from under a marker)."""
        (x0, x1), (y0, y1) = _window(centre[None], r, OCC_SCALE, self.mask.shape[0])
        self.mask[y0:y1, x0:x1] |= np.hypot(self.cx[:, x0:x1] - centre[0], self.cy[y0:y1] - centre[1]) <= r

    def _samples(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Points along segments a -> b: a, b (..., 2) -> (..., P, 2)."""
        return a[..., None, :] + self.t * (b - a)[..., None, :]

    def first_dash(self, start: np.ndarray) -> np.ndarray | None:
        """A dash leaving `start` in a uniformly drawn free direction."""
        angles = self.rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, N_TURNS, endpoint=False)
        dirs = np.stack([np.cos(angles), np.sin(angles)], -1)  # (T, 2)
        ends = start + self.cfg.paddle_length * dirs  # (T, 2)
        ok = self._free(self._samples(np.broadcast_to(start, ends.shape), ends))  # (T,)
        if not ok.any():
            return None
        k = self.rng.choice(np.flatnonzero(ok))
        return np.stack([start, ends[k]])

    def next_dash(self, prev: np.ndarray) -> np.ndarray | None:
        """The dash continuing `prev` (start, end), drawn with the continuity-weighted rule: it runs
        from `margin` to `paddle_length + margin` away from the end of `prev` (the pivot)."""
        cfg, m = self.cfg, self.margin
        heading = np.arctan2(*(prev[1] - prev[0])[::-1])
        turns = self.turns + self.rng.uniform(-0.5, 0.5) * (2 * np.pi / N_TURNS)  # (T,) jittered fan
        bend = np.abs(turns) * cfg.continuity  # (T,)
        # cos(pi/2) is 6e-17, not 0: cut explicitly so a blocked fan cannot pick a hairpin.
        weight = np.where(bend < np.pi / 2, np.cos(bend), 0.0) ** 2
        dirs = np.stack([np.cos(heading + turns), np.sin(heading + turns)], -1)  # (T, 2)
        starts = prev[1] + m * dirs  # (T, 2)
        ends = prev[1] + (cfg.paddle_length + m) * dirs  # (T, 2)
        # Test the gap as well as the dash, so no other snake can cross between two dashes.
        weight = weight * self._free(self._samples(np.broadcast_to(prev[1], ends.shape), ends))
        cum = np.cumsum(weight)  # (T,)
        if cum[-1] <= 0:
            return None
        # u < cum[-1], so the first cum > u has positive weight (no rounding escape to the end).
        k = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return np.stack([starts[k], ends[k]])

    def _with_others(self, pending: list, j: int, fn):
        """fn() with the other snakes' latest (not yet stamped) dashes counted as taken."""
        others = [d for i, d in enumerate(pending) if i != j and d is not None]
        if not others:
            return fn()
        keep = self.mask.copy()
        for d in others:
            self.stamp(d)
        try:
            return fn()
        finally:
            self.mask[:] = keep

    def snakes(self, starts: list[np.ndarray], n_dashes: int) -> list[np.ndarray] | None:
        """Grow one snake of n_dashes from each start, a dash at a time in turn (the targets grow
        side by side, so neither takes the other's room first); None, mask untouched, if one gets stuck.

        A snake's latest dash joins the mask only once its successor is placed (the gap to the
        successor is narrower than the clearance), but it blocks the other snakes at once.
        """
        saved = self.mask.copy()
        snakes: list[list] = [[] for _ in starts]
        for j, s in enumerate(starts):
            first = self._with_others([sn[-1] if sn else None for sn in snakes], j,
                                      lambda s=s: self.first_dash(s) if self._free(s[None, None])[0] else None)
            if first is None:
                self.mask[:] = saved
                return None
            snakes[j].append(first)
        for _ in range(n_dashes - 1):
            for j, snake in enumerate(snakes):
                nxt = self._with_others([sn[-1] for sn in snakes], j, lambda sn=snake: self.next_dash(sn[-1]))
                if nxt is None:
                    self.mask[:] = saved
                    return None
                self.stamp(snake[-1])
                snake.append(nxt)
        for snake in snakes:
            self.stamp(snake[-1])
        return [np.stack(snake) for snake in snakes]  # each (n, 2, 2)


def _window(dash: np.ndarray, r: float, scale: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Index ranges (x, y) of the grid cells (`scale` per pixel) within r of the dash's bounding box."""
    (xmin, ymin), (xmax, ymax) = dash.min(0).tolist(), dash.max(0).tolist()
    return ((max(math.floor((xmin - r) * scale), 0), min(math.ceil((xmax + r) * scale), size)),
            (max(math.floor((ymin - r) * scale), 0), min(math.ceil((ymax + r) * scale), size)))


def _point_snake_distance(p: np.ndarray, snake: np.ndarray) -> float:
    """Distance from point p (2,) to the nearest dash of snake (n, 2, 2)."""
    a, ab = snake[:, 0], snake[:, 1] - snake[:, 0]  # (n, 2)
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)  # (n,)
    return float(np.linalg.norm(p - (a + t[:, None] * ab), axis=-1).min())


def _segment_distance(px, py, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points (px, py) (broadcastable) to the segment a-b."""
    ab = b - a
    denom = float(ab @ ab) or 1.0
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / denom, 0.0, 1.0)
    return np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1]))


def _seed_box(cfg: PathfinderConfig) -> tuple[float, float]:
    """Where the first target's start tip may lie: the original generator keeps it 2 * seed_distance
    from every edge (the central square), or anywhere a marker fits if that square is empty."""
    lo, hi = cfg.marker_radius + 1.0, cfg.resolution - cfg.marker_radius - 1.0
    c_lo, c_hi = 2 * cfg.seed_distance, cfg.resolution - 2 * cfg.seed_distance
    return (max(lo, c_lo), min(hi, c_hi)) if c_lo < c_hi else (lo, hi)


def _targets(cfg: PathfinderConfig, canvas: _Canvas, rng: np.random.Generator) -> list | None:
    """The two target snakes, start tips seed_distance apart, in random order (or None: restart)."""
    s0 = rng.uniform(*_seed_box(cfg), size=2)
    phi = rng.uniform(0, 2 * np.pi)
    s1 = s0 + cfg.seed_distance * np.array([np.cos(phi), np.sin(phi)])
    lo, hi = cfg.marker_radius + 1.0, cfg.resolution - cfg.marker_radius - 1.0
    if not ((s1 >= lo) & (s1 <= hi)).all():
        return None
    targets = canvas.snakes([s0, s1], cfg.contour_length)
    if targets is None:
        return None
    # Either target may carry the shared marker, so neither growth order is a cue.
    return targets if rng.random() < 0.5 else targets[::-1]


def _try_sample(cfg: PathfinderConfig, rng: np.random.Generator, label: int) -> Geometry | None:
    margin = float(cfg.margins[int(rng.integers(len(cfg.margins)))])
    canvas = _Canvas(cfg, rng, margin)
    targets = _targets(cfg, canvas, rng)
    if targets is None:
        return None
    a, b = targets
    if label == 1:
        markers, ends = np.stack([a[0, 0], a[-1, 1]]), ((0, 0), (0, 1))
    else:
        markers, ends = np.stack([a[0, 0], b[-1, 1]]), ((0, 0), (1, 1))
    # A marker may touch only its own snake: restart if the other target passes under it,
    # and keep distractors out of the marker disks.
    clear = cfg.marker_radius + margin
    for m, (s, _) in zip(markers, ends):
        if _point_snake_distance(m, targets[1 - s]) < clear:
            return None
        canvas.stamp_disk(m, clear)
    lo, hi = canvas.border, cfg.resolution - canvas.border
    distractors = []
    for _ in range(cfg.distractors):
        for _attempt in range(DISTRACTOR_TRIES):
            d = canvas.snakes([rng.uniform(lo, hi, size=2)], cfg.distractor_length)
            if d is not None:
                distractors += d
                break
    return Geometry(label=label, margin=margin, snakes=targets + distractors,
                    intensities=_intensities(cfg, rng, [len(s) for s in targets + distractors]),
                    markers=markers, marker_ends=ends)


def _intensities(cfg: PathfinderConfig, rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    """Per-dash brightness: targets `snake mu * paddle contrast` (each target's mu drawn from the
    snake contrasts without replacement, as the original does), distractors a snake contrast per dash."""
    mus = rng.permutation(np.array(cfg.snake_contrasts * 2, dtype=float))[:2]
    out = [mu * rng.choice(np.array(cfg.paddle_contrasts, dtype=float), size=n) for mu, n in zip(mus, lengths[:2])]
    return out + [rng.choice(np.array(cfg.snake_contrasts, dtype=float), size=n) for n in lengths[2:]]


def render(cfg: PathfinderConfig, geom: Geometry) -> np.ndarray:
    """Draw the geometry: (res, res) uint8, anti-aliased dashes and markers on black, brightest = 255."""
    ss, res = cfg.supersample, cfg.resolution
    cells = (np.arange(res * ss) + 0.5) / ss
    cx, cy = cells[None, :], cells[:, None]
    canvas = np.zeros((res * ss, res * ss))  # (R, R) supersampled intensity
    half = cfg.thickness / 2
    for snake, levels in zip(geom.snakes, geom.intensities):
        for dash, level in zip(snake, levels):
            (x0, x1), (y0, y1) = _window(dash, half + 1.0, ss, res * ss)
            d = _segment_distance(cx[:, x0:x1], cy[y0:y1], dash[0], dash[1])  # (h, w)
            np.maximum(canvas[y0:y1, x0:x1], level * np.clip((half - d) * ss + 0.5, 0.0, 1.0),
                       out=canvas[y0:y1, x0:x1])
    for m in geom.markers:
        (x0, x1), (y0, y1) = _window(m[None], cfg.marker_radius + 1.0, ss, res * ss)
        d = np.hypot(cx[:, x0:x1] - m[0], cy[y0:y1] - m[1])  # (h, w)
        np.maximum(canvas[y0:y1, x0:x1], np.clip((cfg.marker_radius - d) * ss + 0.5, 0.0, 1.0),
                   out=canvas[y0:y1, x0:x1])
    img = canvas.reshape(res, ss, res, ss).mean(axis=(1, 3))  # (res, res)
    # The original wrote float images with a writer that stretched [min, max] to [0, 255].
    return np.rint(img / max(float(img.max()), 1e-12) * 255).astype(np.uint8)


def generate_sample(cfg: PathfinderConfig, rng: np.random.Generator, *, label: int | None = None
                    ) -> tuple[np.ndarray, int, Geometry]:
    """One image: (pixels (res, res) uint8, label, geometry). The label is drawn if not given."""
    if label is None:
        label = int(rng.integers(2))
    if label not in (0, 1):
        raise ValueError(f"label must be 0, 1 or None, got {label!r}")
    for _ in range(MAX_ATTEMPTS):
        geom = _try_sample(cfg, rng, label)
        if geom is not None:
            return render(cfg, geom), label, geom
    raise RuntimeError(f"could not place two target snakes of {cfg.contour_length} dashes on a "
                       f"{cfg.resolution} px canvas in {MAX_ATTEMPTS} attempts; shorten the contour")


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index`: independent of worker count and order."""
    return np.random.default_rng([seed, index])


def sample_sheet(resolution: int, path: str | Path, *, seed: int = 0, contour_length: int = 14,
                 rows: int = 4, cols: int = 4, tile: int = 256) -> Path:
    """Save a rows x cols grid of generated images (labels alternate 1, 0), each upscaled to `tile`
    px with nearest-neighbour and captioned with its label; returns the path."""
    from PIL import Image, ImageDraw

    cfg = preset(resolution, contour_length)
    scale = max(1, tile // resolution)
    size, pad, strip = resolution * scale, 6, 16
    sheet = Image.new("L", (cols * (size + pad) + pad, rows * (size + pad + strip) + pad), 90)
    draw = ImageDraw.Draw(sheet)
    for i in range(rows * cols):
        label = 1 - i % 2
        pixels, _, _ = generate_sample(cfg, image_rng(seed, i), label=label)
        x, y = pad + (i % cols) * (size + pad), pad + (i // cols) * (size + pad + strip)
        sheet.paste(Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST), (x, y))
        text = "label 1: connected" if label else "label 0: not connected"
        draw.text((x + 2, y + size + 2), text, fill=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.lra.data.pathfinder",
        description="Write a sample sheet (4 x 4 generated images, labels alternating) per resolution "
                    "to OUT/pathfinder-<res>.png. Data sets: python -m experiments.lra.data.generate pathfinder.")
    parser.add_argument("--out", required=True, help="folder for pathfinder-<res>.png")
    parser.add_argument("--resolution", type=int, nargs="+", choices=sorted(_PRESETS), default=sorted(_PRESETS))
    parser.add_argument("--contour-length", type=int, choices=(6, 9, 14), default=14)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for res in args.resolution:
        path = sample_sheet(res, Path(args.out) / f"pathfinder-{res}.png", seed=args.seed,
                            contour_length=args.contour_length)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
