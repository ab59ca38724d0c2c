"""Pathfinder generator: documented settings, label geometry from its own record, dash rules,
distractor counts, margins, intensities, rendering, determinism, CLIs."""
import dataclasses
import math

import numpy as np
import pytest

from experiments.lra.data import generate, pathfinder
from experiments.lra.data import load_task


def _points(snake, n=9):
    """Points along every dash and every gap between consecutive dashes."""
    t = np.linspace(0, 1, n)[:, None]
    path = snake.reshape(-1, 2)  # start0, end0, start1, end1, ...: consecutive pairs are dashes and gaps
    return np.concatenate([a + t * (b - a) for a, b in zip(path[:-1], path[1:])])


def _check_geometry(cfg, geom, label):
    assert geom.label == label
    a, b = geom.snakes[0], geom.snakes[1]
    assert a.shape == b.shape == (cfg.contour_length, 2, 2)
    # The two target start tips are seed_distance apart.
    assert math.isclose(np.linalg.norm(a[0, 0] - b[0, 0]), cfg.seed_distance, rel_tol=1e-9)
    tips = {(s, e): geom.snakes[s][0, 0] if e == 0 else geom.snakes[s][-1, 1]
            for s in range(len(geom.snakes)) for e in (0, 1)}
    for marker, (s, e) in zip(geom.markers, geom.marker_ends):
        assert np.allclose(marker, tips[(s, e)]), "marker is not on the snake tip it claims"
    (s0, e0), (s1, e1) = geom.marker_ends
    if label == 1:
        assert s0 == s1 and {e0, e1} == {0, 1}, "label 1 must mark both ends of one snake"
    else:
        assert s0 != s1 and {s0, s1} == {0, 1}, "label 0 must mark two different target snakes"
    # A marker touches only its own snake: every other snake keeps marker_radius + margin away.
    for marker, (s, _) in zip(geom.markers, geom.marker_ends):
        for j, snake in enumerate(geom.snakes):
            if j != s:
                dist = np.linalg.norm(_points(snake, 33) - marker, axis=-1).min()
                assert dist >= cfg.marker_radius + geom.margin - 0.5, f"snake {j} runs under a marker"
    assert geom.margin in cfg.margins
    assert len(geom.intensities) == len(geom.snakes)
    # Dash rules: length, gap to the previous dash = margin, turn within the continuity limit.
    max_turn = math.pi / (2 * cfg.continuity)
    for snake in geom.snakes:
        lengths = np.linalg.norm(snake[:, 1] - snake[:, 0], axis=-1)
        assert np.allclose(lengths, cfg.paddle_length)
        gaps = np.linalg.norm(snake[1:, 0] - snake[:-1, 1], axis=-1)
        assert np.allclose(gaps, geom.margin)
        d = snake[:, 1] - snake[:, 0]
        cos = (d[1:] * d[:-1]).sum(-1) / (lengths[1:] * lengths[:-1])
        assert (np.arccos(np.clip(cos, -1, 1)) <= max_turn + 1e-9).all()
        assert ((snake >= cfg.padding) & (snake <= cfg.resolution - cfg.padding)).all()
    # Different snakes never touch: clearance at least margin + thickness/2, less one
    # occupancy cell's half diagonal (the mask is a grid). So label 0 really is disconnected.
    bound = geom.margin + cfg.thickness / 2 - math.sqrt(2) / (2 * pathfinder.OCC_SCALE) - 1e-9
    pts = [_points(s) for s in geom.snakes]
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            dist = np.linalg.norm(pts[i][:, None] - pts[j][None], axis=-1).min()
            assert dist >= bound, f"snakes {i} and {j} are {dist:.3f} px apart"


@pytest.mark.parametrize("resolution,contour_length,n", [(32, 14, 12), (32, 6, 4), (64, 9, 2), (128, 14, 2)])
def test_label_geometry_by_construction(resolution, contour_length, n):
    cfg = pathfinder.preset(resolution, contour_length)
    for i in range(n):
        for label in (0, 1):
            pixels, got, geom = pathfinder.generate_sample(cfg, pathfinder.image_rng(i, label), label=label)
            assert got == label
            _check_geometry(cfg, geom, label)
            assert pixels.shape == (resolution, resolution) and pixels.dtype == np.uint8
            # Markers are drawn: the pixel under each marker centre is bright.
            for x, y in geom.markers:
                assert pixels[int(y), int(x)] >= 200
            if contour_length == 14:
                assert len(geom.snakes) > 2  # distractors present


# The per-resolution settings documented for the LRA release: google-research/long-range-arena,
# lra_benchmarks/data/pathfinder.py (docstrings of Pathfinder32, Pathfinder64, Pathfinder128), which
# list what was changed from the defaults of drewlinsley/pathfinder's snakes2_wrapper.py (Args:
# paddle_length 5, paddle_contrast_list [1.0]). Where a docstring sets a value twice (antialias_scale
# 4, then 2), the later one is what ran. Distractors: distractor_length = 14 / 3 and
# num_distractor_snakes = budget / distractor_length in Python 2 integer arithmetic.
DOCUMENTED = {
    32: dict(paddle_length=2, thickness=0.5, supersample=2, margins=(1,), marker_radius=1.5,
             seed_distance=7, continuity=1.0, padding=1, snake_contrasts=(2,), paddle_contrasts=(0.75,),
             distractor_length=4, distractors=5),        # 20 // (14 // 3)
    64: dict(paddle_length=5, thickness=1, supersample=2, margins=(1,), marker_radius=2.5,
             seed_distance=12, continuity=1.8, padding=1, snake_contrasts=(0.8,), paddle_contrasts=(1.0,),
             distractor_length=4, distractors=5),        # 22 / (14 / 3) in Python 2
    128: dict(paddle_length=5, thickness=1.5, supersample=2, margins=(2, 3), marker_radius=3,
              seed_distance=20, continuity=1.8, padding=1, snake_contrasts=(0.9,), paddle_contrasts=(1.0,),
              distractor_length=4, distractors=8),       # 35 / (14 / 3) in Python 2 (7.5 -> 8 either way)
}


@pytest.mark.parametrize("resolution", sorted(DOCUMENTED))
def test_preset_equals_documented_settings(resolution):
    cfg = pathfinder.preset(resolution, 14)
    assert cfg.resolution == resolution and cfg.contour_length == 14
    for key, value in DOCUMENTED[resolution].items():
        got = getattr(cfg, key)
        assert (tuple(map(float, got)) == tuple(map(float, value)) if isinstance(value, tuple)
                else float(got) == float(value)), f"{resolution} px {key}: {got!r} != documented {value!r}"


def test_distractor_count_and_length_follow_the_budget():
    # Other difficulties use the same rule: contour_length // 3 dashes, budget // that many snakes.
    cfg = pathfinder.preset(32, 6)
    assert (cfg.distractor_length, cfg.distractors) == (2, 10)
    assert pathfinder.preset(128, 9).distractors == 35 // 3
    assert dataclasses.replace(cfg, n_distractors=3).distractors == 3


@pytest.mark.parametrize("resolution,n", [(32, 12), (128, 12)])
def test_generated_distractors_margins_and_seed(resolution, n):
    cfg = pathfinder.preset(resolution, 14)
    counts, margins = [], []
    lo, hi = 2 * cfg.seed_distance, cfg.resolution - 2 * cfg.seed_distance
    for i in range(n):
        _, _, geom = pathfinder.generate_sample(cfg, pathfinder.image_rng(11, i))
        counts.append(len(geom.snakes) - 2)
        margins.append(geom.margin)
        assert all(len(d) == cfg.distractor_length for d in geom.snakes[2:])
        # The start tip of the target that grew first lies in the central square (the other one is
        # seed_distance away); which of the two is snakes[0] is random.
        tips = [geom.snakes[0][0, 0], geom.snakes[1][0, 0]]
        assert any(((t >= lo) & (t <= hi)).all() for t in tips)
    # A distractor is left out only after 5 failed tries; on these canvases that is rare.
    assert max(counts) == cfg.distractors and np.mean(counts) >= 0.9 * cfg.distractors, counts
    assert set(margins) == set(cfg.margins), margins  # 128 px: both 2 and 3 occur in 12 images


def test_intensities_follow_the_contrast_settings():
    cfg = pathfinder.preset(32, 14)  # targets 2 * 0.75, distractors 2, markers 1
    pixels, _, geom = pathfinder.generate_sample(cfg, pathfinder.image_rng(2, 0))
    assert all(np.allclose(v, 1.5) for v in geom.intensities[:2])
    assert all(np.allclose(v, 2.0) for v in geom.intensities[2:])
    assert pixels.max() == 255  # the brightest pixel is stretched to white, as the original writer did
    cfg2 = dataclasses.replace(cfg, snake_contrasts=(1.0, 3.0), paddle_contrasts=(0.5, 1.0))
    _, _, g2 = pathfinder.generate_sample(cfg2, pathfinder.image_rng(2, 1))
    for v in g2.intensities[:2]:  # one snake contrast per target times a paddle contrast per dash
        assert any(set(np.round(v / mu, 9)) <= {0.5, 1.0} for mu in (1.0, 3.0)), v
    assert all(set(np.round(v, 9)) <= {1.0, 3.0} for v in g2.intensities[2:])


def test_sample_sheet_cli(tmp_path):
    assert pathfinder.main(["--out", str(tmp_path), "--resolution", "32"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "pathfinder-32.png") as im:
        assert im.mode == "L" and im.size[0] > 4 * 256


def test_images_look_like_pathfinder():
    cfg = pathfinder.preset(32, 14)
    pixels, _, geom = pathfinder.generate_sample(cfg, pathfinder.image_rng(0, 0))
    lit = pixels > 64
    # Thin dashed lines on black: a minority of pixels lit, gaps between dashes.
    assert 0.05 < lit.mean() < 0.5
    assert pixels.min() == 0 and pixels.max() == 255
    n_dashes = sum(len(s) for s in geom.snakes)
    assert n_dashes >= 2 * cfg.contour_length


def test_labels_are_balanced_when_drawn():
    cfg = pathfinder.preset(32, 6)
    labels = [pathfinder.generate_sample(cfg, pathfinder.image_rng(1, i))[1] for i in range(40)]
    assert 10 <= sum(labels) <= 30


def test_same_seed_same_image():
    cfg = pathfinder.preset(32, 9)
    a = pathfinder.generate_sample(cfg, pathfinder.image_rng(4, 17))[0]
    b = pathfinder.generate_sample(cfg, pathfinder.image_rng(4, 17))[0]
    c = pathfinder.generate_sample(cfg, pathfinder.image_rng(5, 17))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match="resolution"):
        pathfinder.preset(48)
    with pytest.raises(ValueError, match="contour_length"):
        pathfinder.preset(32, 7)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_deterministic_across_workers_and_readable(tmp_path):
    common = ["pathfinder", "--resolution", "32", "--contour-length", "6", "--n", "30", "--seed", "3",
              "--per-folder", "16"]
    assert generate.main(common + ["--out", str(tmp_path / "a"), "--workers", "1",
                                   "--sample-sheet", str(tmp_path / "sheet.png")]) == 0
    assert generate.main(common + ["--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b
    assert "pathfinder32/curv_baseline/imgs/1/sample_13.png" in a
    assert "pathfinder32/curv_baseline/metadata/0.npy" in a
    assert (tmp_path / "sheet.png").stat().st_size > 0
    ds = load_task("pathfinder", tmp_path / "a", contour_length=6)
    assert [len(ds[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    # Labels read back are the generator's labels for those images.
    cfg = pathfinder.preset(32, 6)
    for split in ("train", "test"):
        for path, label in zip(ds[split].paths[:3], ds[split].labels[:3]):
            b_idx, k = int(path.parent.name), int(path.stem.split("_")[1])
            _, expected, _ = pathfinder.generate_sample(cfg, pathfinder.image_rng(3, b_idx * 16 + k))
            assert label == expected
