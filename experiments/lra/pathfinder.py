"""Pathfinder / Path-X image generator (SPEC 6), numpy + pillow only.

An image holds two target snakes of `contour_length` dashes ("paddles") whose start tips are
`seed_distance` apart, plus distractor snakes of `contour_length // 3` dashes. Each dash starts
`margin` past the end (pivot) of the previous one and ends on the circle of radius
`paddle_length + margin` around the pivot; its direction is drawn with weight
`(1 - occupied) * max(cos(min(|turn| * continuity, pi/2)), 0)^2` over a fan of candidate
turns, where `occupied` tests the dash against a mask of every earlier dash dilated by the margin
(the snake's own latest dash is added only once the next one is placed, so the gap is allowed).
Two markers are drawn on snake tips: label 1 puts them on both ends of one target snake, label 0
on the start of one target and the far end of the other. Both classes contain the same kind of
content (two targets with nearby start tips), only the marker placement differs, so the label
is right by construction; `Geometry` records what was drawn so tests can check it.
Drawing is anti-aliased by rendering at `supersample` x resolution and box-downsampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

N_TURNS = 33          # candidate turn angles per dash, evenly spaced over (-pi, pi)
MAX_ATTEMPTS = 200    # whole-image restarts before giving up (never reached in practice)
OCC_SCALE = 2         # occupancy cells per pixel


@dataclass(frozen=True)
class PathfinderConfig:
    """Drawing parameters; lengths are in output pixels (see `preset` for the published ones)."""
    resolution: int = 32
    contour_length: int = 14
    paddle_length: float = 2.0
    thickness: float = 0.5
    supersample: int = 2
    margin: float = 1.0
    marker_radius: float = 1.5
    seed_distance: float = 7.0
    continuity: float = 1.0
    contrast: float = 1.5
    n_distractors: int | None = None  # default 20 // (contour_length // 3)

    @property
    def distractors(self) -> int:
        if self.n_distractors is not None:
            return self.n_distractors
        return 20 // max(self.contour_length // 3, 1)


_PRESETS = {
    32: dict(paddle_length=2.0, thickness=0.5, supersample=2, margin=1.0, marker_radius=1.5,
             seed_distance=7.0, continuity=1.0),
    # 64 px sits between the two published presets.
    64: dict(paddle_length=3.0, thickness=1.0, supersample=2, margin=1.5, marker_radius=2.0,
             seed_distance=12.0, continuity=1.4),
    128: dict(paddle_length=5.0, thickness=1.5, supersample=2, margin=2.5, marker_radius=3.0,
              seed_distance=20.0, continuity=1.8),
}


def preset(resolution: int, contour_length: int = 14) -> PathfinderConfig:
    """The published settings for 32 px (Pathfinder) and 128 px (Path-X), interpolated at 64 px."""
    if resolution not in _PRESETS:
        raise ValueError(f"resolution must be one of {sorted(_PRESETS)}, got {resolution}")
    if contour_length not in (6, 9, 14):
        raise ValueError(f"contour_length must be 6, 9 or 14, got {contour_length}")
    return PathfinderConfig(resolution=resolution, contour_length=contour_length, **_PRESETS[resolution])


@dataclass
class Geometry:
    """What was drawn. Points are (x, y) in pixels, pixel i covering [i, i+1).

    snakes[0] and snakes[1] are the targets (snakes[0] carries marker 0 on its start tip),
    the rest distractors; each snake is (n_dashes, 2, 2): per dash its (start, end) point.
    markers (2, 2) are marker centres; marker_ends[i] = (snake index, 0 for start / 1 for end).
    """
    label: int
    snakes: list[np.ndarray] = field(default_factory=list)
    markers: np.ndarray | None = None
    marker_ends: tuple = ()


class _Canvas:
    """Occupancy mask plus the dash-placement rule."""

    def __init__(self, cfg: PathfinderConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        g = cfg.resolution * OCC_SCALE
        self.mask = np.zeros((g, g), dtype=bool)  # (G, G) True = taken
        self.border = max(cfg.thickness, 1.0)
        cells = (np.arange(g) + 0.5) / OCC_SCALE
        self.cx, self.cy = cells[None, :], cells[:, None]  # cell centres, (1, G) and (G, 1)
        n = max(int(np.ceil((cfg.paddle_length + cfg.margin) * OCC_SCALE)) + 1, 2)
        self.t = np.linspace(0.0, 1.0, n)[:, None]  # (P, 1) sample spacing below one cell
        self.turns = np.linspace(-np.pi, np.pi, N_TURNS, endpoint=False) + np.pi / N_TURNS  # (T,)

    def _free(self, pts: np.ndarray) -> np.ndarray:
        """pts (..., P, 2) -> (...,) True where every point is inside the canvas and untaken."""
        lo, hi = self.border, self.cfg.resolution - self.border
        inside = ((pts >= lo) & (pts <= hi)).all(-1)  # (..., P)
        idx = np.clip((pts * OCC_SCALE).astype(int), 0, self.mask.shape[0] - 1)
        return (inside & ~self.mask[idx[..., 1], idx[..., 0]]).all(-1)

    def stamp(self, dash: np.ndarray) -> None:
        """Mark every cell within thickness/2 + margin of the dash (start, end) as taken."""
        r = self.cfg.thickness / 2 + self.cfg.margin
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
        """The dash continuing `prev` (start, end), drawn with the continuity-weighted rule."""
        cfg = self.cfg
        heading = np.arctan2(*(prev[1] - prev[0])[::-1])
        turns = self.turns + self.rng.uniform(-0.5, 0.5) * (2 * np.pi / N_TURNS)  # (T,) jittered fan
        bend = np.abs(turns) * cfg.continuity  # (T,)
        # cos(pi/2) is 6e-17, not 0: cut explicitly so a blocked fan cannot pick a hairpin.
        weight = np.where(bend < np.pi / 2, np.cos(bend), 0.0) ** 2
        dirs = np.stack([np.cos(heading + turns), np.sin(heading + turns)], -1)  # (T, 2)
        starts = prev[1] + cfg.margin * dirs  # (T, 2)
        ends = prev[1] + (cfg.paddle_length + cfg.margin) * dirs  # (T, 2)
        # Test the gap as well as the dash, so no other snake can cross between two dashes.
        weight = weight * self._free(self._samples(np.broadcast_to(prev[1], ends.shape), ends))
        cum = np.cumsum(weight)  # (T,)
        if cum[-1] <= 0:
            return None
        # u < cum[-1], so the first cum > u has positive weight (no rounding escape to the end).
        k = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return np.stack([starts[k], ends[k]])

    def snake(self, start: np.ndarray, n_dashes: int, *, partial: bool = False) -> np.ndarray | None:
        """Grow a snake of n_dashes from `start`; None if it gets stuck (unless `partial`)."""
        if not self._free(start[None, None])[0]:
            return None
        dashes = []
        dash = self.first_dash(start)
        while dash is not None:
            dashes.append(dash)
            if len(dashes) == n_dashes:
                break
            nxt = self.next_dash(dash)
            if nxt is not None:
                self.stamp(dash)  # the latest dash joins the mask only once its successor exists
            dash = nxt
        if len(dashes) < n_dashes and not (partial and dashes):
            return None  # only targets get here; the caller restarts the whole image
        self.stamp(dashes[-1])
        return np.stack(dashes)  # (n, 2, 2)


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


def _try_sample(cfg: PathfinderConfig, rng: np.random.Generator, label: int) -> Geometry | None:
    canvas = _Canvas(cfg, rng)
    lo = cfg.marker_radius + 1.0  # markers must fit on the canvas
    hi = cfg.resolution - lo
    s0 = rng.uniform(lo, hi, size=2)
    first = canvas.snake(s0, cfg.contour_length)
    if first is None:
        return None
    second, saved = None, canvas.mask.copy()
    for _ in range(5):  # a stuck second target is retried from a fresh seed direction
        phi = rng.uniform(0, 2 * np.pi)
        s1 = s0 + cfg.seed_distance * np.array([np.cos(phi), np.sin(phi)])
        if ((s1 >= lo) & (s1 <= hi)).all():
            second = canvas.snake(s1, cfg.contour_length)
            if second is not None:
                break
            canvas.mask[:] = saved
    if second is None:
        return None
    # Either target may carry the shared marker, so neither growth order is a cue.
    targets = [first, second] if rng.random() < 0.5 else [second, first]
    a, b = targets
    if label == 1:
        markers, ends = np.stack([a[0, 0], a[-1, 1]]), ((0, 0), (0, 1))
    else:
        markers, ends = np.stack([a[0, 0], b[-1, 1]]), ((0, 0), (1, 1))
    # A marker may touch only its own snake: restart if the other target passes under it,
    # and keep distractors out of the marker disks.
    clear = cfg.marker_radius + cfg.margin
    for m, (s, _) in zip(markers, ends):
        if _point_snake_distance(m, targets[1 - s]) < clear:
            return None
        canvas.stamp_disk(m, clear)
    distractors = []
    for _ in range(cfg.distractors):
        for _attempt in range(10):
            d = canvas.snake(rng.uniform(lo, hi, size=2), max(cfg.contour_length // 3, 1), partial=True)
            if d is not None:
                distractors.append(d)
                break
    return Geometry(label=label, snakes=targets + distractors, markers=markers, marker_ends=ends)


def render(cfg: PathfinderConfig, geom: Geometry) -> np.ndarray:
    """Draw the geometry: (res, res) uint8, white anti-aliased dashes and markers on black."""
    ss, res = cfg.supersample, cfg.resolution
    cells = (np.arange(res * ss) + 0.5) / ss
    cx, cy = cells[None, :], cells[:, None]
    canvas = np.zeros((res * ss, res * ss))  # (R, R) supersampled coverage
    half = cfg.thickness / 2
    for snake in geom.snakes:
        for dash in snake:
            (x0, x1), (y0, y1) = _window(dash, half + 1.0, ss, res * ss)
            d = _segment_distance(cx[:, x0:x1], cy[y0:y1], dash[0], dash[1])  # (h, w)
            np.maximum(canvas[y0:y1, x0:x1], np.clip((half - d) * ss + 0.5, 0.0, 1.0),
                       out=canvas[y0:y1, x0:x1])
    for m in geom.markers:
        (x0, x1), (y0, y1) = _window(m[None], cfg.marker_radius + 1.0, ss, res * ss)
        d = np.hypot(cx[:, x0:x1] - m[0], cy[y0:y1] - m[1])  # (h, w)
        np.maximum(canvas[y0:y1, x0:x1], np.clip((cfg.marker_radius - d) * ss + 0.5, 0.0, 1.0),
                   out=canvas[y0:y1, x0:x1])
    img = canvas.reshape(res, ss, res, ss).mean(axis=(1, 3))  # (res, res)
    return np.rint(np.clip(img * cfg.contrast, 0.0, 1.0) * 255).astype(np.uint8)


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
