"""Units as masks: quantile thresholds, bilinear upsampling, the vectorised sketch IoU."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deepminer  # noqa: F401  (torchvision compatibility)
from deepminer.explain.sketch import IOU_SIDE, MATCH_IOU, iou_work_size, matching_units, sketch_at, sketch_iou
from deepminer.explain.units import mask_iou, quantile_thresholds, unit_masks, unit_thresholds, upsample_maps


def loop_iou(sketch, maps, thresholds, work_side=IOU_SIDE):
    """The plain reference: one unit at a time, full upsampled mask, set IoU."""
    size = iou_work_size(sketch.shape, work_side)
    s = sketch_at(sketch, size)
    return np.array([mask_iou(unit_masks(maps[k:k + 1], thresholds[k:k + 1], size)[0], s)
                     for k in range(len(maps))])


def test_quantile_thresholds_hand_example():
    values = np.array([[0, 10], [1, 20], [2, 30], [3, 40], [4, 50]], dtype=np.float32)
    # linear interpolation: q=0.5 -> the middle row; q=0.9 -> index 3.6
    assert np.allclose(quantile_thresholds(values, 0.5), [2, 30])
    assert np.allclose(quantile_thresholds(values, 0.9), [3.6, 46])
    with pytest.raises(ValueError):
        quantile_thresholds(values[:, 0], 0.5)


def test_unit_thresholds_streams_batches():
    rng = np.random.default_rng(1)
    batches = [rng.random((3, 4, 5, 6)).astype(np.float32) for _ in range(4)]
    allv = np.concatenate([b.transpose(0, 2, 3, 1).reshape(-1, 4) for b in batches])
    assert np.allclose(unit_thresholds(iter(batches), 0.99), np.quantile(allv, 0.99, axis=0), atol=1e-6)
    # a single (K, h, w) map counts as one image; subsampling keeps the estimate close
    assert np.allclose(unit_thresholds([batches[0][0]], 0.5), np.quantile(batches[0][0].reshape(4, -1), 0.5, axis=1))
    est = unit_thresholds(batches, 0.9, max_samples=200)
    assert est.shape == (4,) and np.all(np.abs(est - np.quantile(allv, 0.9, axis=0)) < 0.1)


def test_upsample_hand_example():
    # align_corners=False, 2 -> 4: source positions -0.25, 0.25, 0.75, 1.25 (clamped to 0 and 1)
    up = upsample_maps(np.array([[[0.0, 1.0]]]), (1, 4))
    assert np.allclose(up, [[[0.0, 0.25, 0.75, 1.0]]])
    maps = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(maps)[None].double(), size=(11, 13), mode="bilinear", align_corners=False)[0]
    assert np.allclose(upsample_maps(maps, (11, 13)), ref.numpy())


def test_sketch_iou_hand_worked_4x4():
    # 2x2 unit maps upsampled to the 4x4 sketch grid; per axis the weight of cell 0 is
    # [1, .75, .25, 0] and of cell 1 [0, .25, .75, 1].
    maps = np.zeros((4, 2, 2))
    maps[0, 0, 0] = 1.0  # values w0[y]*w0[x] > .5 -> the top-left 2x2 block (4 px)
    maps[1, 1, 1] = 1.0  # w1[y]*w1[x] > .2 -> (1,3) (2,2) (2,3) (3,1) (3,2) (3,3) (6 px)
    maps[3] = 1.0  # constant: the whole grid
    thresholds = np.array([0.5, 0.2, 0.0, 0.5])  # unit 2: all zero, threshold 0 -> empty mask
    sketch = np.zeros((4, 4), bool)
    sketch[1:3, 1:4] = True  # (1,1) (1,2) (1,3) (2,1) (2,2) (2,3)
    masks = unit_masks(maps, thresholds, (4, 4))
    assert masks[0].sum() == 4 and masks[0][:2, :2].all()
    assert sorted(zip(*np.nonzero(masks[1]))) == [(1, 3), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)]
    # unit 0: 1 shared px (1,1), union 4+6-1; unit 1: 3 shared, union 6+6-3; unit 3: 6/16
    expected = [1 / 9, 3 / 9, 0.0, 6 / 16]
    assert np.allclose(sketch_iou(sketch, maps, thresholds), expected, atol=1e-7)
    assert np.allclose(loop_iou(sketch, maps, thresholds), expected)


@pytest.mark.parametrize("k,h,w,H,W,work_side,dtype", [
    (40, 7, 5, 61, 47, None, np.float32),     # non-integer factors, sketch at full size
    (30, 12, 9, 400, 300, 64, np.float16),    # sketch reduced to the working size, float16 maps
    (25, 6, 4, 18, 12, None, np.float32),     # integer factor 3: pixel centres on cell centres
    (20, 16, 16, 9, 7, None, np.float32),     # working grid coarser than the map
    (10, 1, 1, 10, 10, None, np.float32),     # a 1x1 map
])
def test_sketch_iou_equals_per_unit_loop(k, h, w, H, W, work_side, dtype):
    rng = np.random.default_rng(h * 100 + w)
    maps = np.maximum(rng.normal(0, 1, (k, h, w)), 0).astype(dtype)  # ReLU-like: many exact zeros
    q = rng.uniform(0.3, 0.95, k)
    thresholds = np.array([np.quantile(maps[i].astype(np.float64), q[i]) for i in range(k)])
    if h * w == 1:  # one value per unit: just below (whole grid) or just above (empty)
        thresholds = maps.reshape(-1).astype(np.float64) + np.where(np.arange(k) % 2, 0.01, -0.01)
    thresholds[:3] = 0.0  # ties at zero: a zero stretch is not above 0
    yy, xx = np.mgrid[:H, :W]
    sketch = (yy - H * 0.4) ** 2 / (H * 0.3) ** 2 + (xx - W * 0.6) ** 2 / (W * 0.25) ** 2 < 1
    got = sketch_iou(sketch, maps, thresholds, work_side=work_side)
    ref = loop_iou(sketch, maps, thresholds, work_side)
    assert got.shape == (k,) and got.dtype == np.float32
    assert np.allclose(got, ref, atol=1e-6), np.abs(got - ref).max()
    assert ref.max() > 0.05  # the case exercises real overlaps


def test_sketch_iou_checks_its_input():
    with pytest.raises(ValueError, match="thresholds"):
        sketch_iou(np.ones((4, 4), bool), np.zeros((2, 2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="maps must be"):
        sketch_iou(np.ones((4, 4), bool), np.zeros((2, 2)), np.zeros(2))


def test_working_size_and_sketch_reduction():
    assert iou_work_size((1536, 908)) == (256, 151)
    assert iou_work_size((100, 50)) == (100, 50) and iou_work_size((3000, 1000), None) == (3000, 1000)
    s = np.zeros((8, 8), bool)
    s[:2, :2] = True  # block (0, 0) full
    s[:2, 2] = True  # block (0, 1) half covered -> in
    s[2, 2] = True  # block (1, 1) a quarter covered -> out
    assert sketch_at(s, (4, 4)).tolist() == [[True, True, False, False]] + [[False] * 4] * 3


def test_sketch_iou_ties_on_constant_maps():
    sketch = np.zeros((6, 6), bool)
    sketch[:3] = True
    ones = np.ones((2, 3, 3))
    # a constant map equals its value everywhere: at that threshold no pixel is above it
    assert np.allclose(sketch_iou(sketch, ones, [1.0, 0.999]), [0.0, 0.5])


def test_matching_units_best_first():
    iou = np.array([0.1, 0.5, 0.2, 0.35, 0.21])
    assert MATCH_IOU == 0.2
    assert matching_units(iou).tolist() == [1, 3, 4]  # above 0.2, strictly
    assert matching_units(iou, 0.4).tolist() == [1]


@pytest.mark.parametrize("shape,size", [((8, 8), (4, 4)), ((61, 47), (20, 13)), ((300, 200), (256, 171)),
                                        ((1536, 908), (256, 151)), ((10, 10), (3, 7))])
def test_sketch_at_equals_area_interpolation(shape, size):
    rng = np.random.default_rng(shape[0])
    s = np.zeros(shape, bool)
    y0, x0 = shape[0] // 5, shape[1] // 4
    s[y0:y0 + shape[0] // 2, x0:x0 + shape[1] // 3] = rng.random((shape[0] // 2, shape[1] // 3)) < 0.7
    ref = F.interpolate(torch.from_numpy(s.astype(np.float32))[None, None], size=size, mode="area")[0, 0] >= 0.5
    assert np.array_equal(sketch_at(s, size), ref.numpy())
    assert not sketch_at(np.zeros(shape, bool), size).any()


@pytest.mark.parametrize("k,h,w,H,W,dtype,signed", [
    (160, 48, 29, 1536, 908, np.float16, False),  # ResNet-50 whole image: 48x29 maps, 256x151 working grid
    (120, 48, 29, 1536, 908, np.float32, True),   # signed maps: falling rows, negative thresholds
    (300, 7, 7, 224, 224, np.float16, False),     # a 224-px patch: 7x7 maps, 32x32 px per cell
    (200, 7, 7, 224, 224, np.float64, True),
])
def test_sketch_iou_random_equals_per_unit_loop(k, h, w, H, W, dtype, signed):
    rng = np.random.default_rng(k + h)
    raw = torch.from_numpy(rng.normal(0, 1, (1, k, h + 2, w + 2)))
    maps = F.avg_pool2d(raw, 3, 1)[0].numpy() * 3  # smooth, like real unit maps
    maps = (maps if signed else np.maximum(maps, 0)).astype(dtype)
    q = rng.uniform(0.5, 0.995, k)
    thresholds = np.array([np.quantile(maps[i].astype(np.float64), q[i]) for i in range(k)])
    thresholds[:4] = 0.0 if not signed else [-0.5, -2.0, 0.0, 0.0]
    thresholds[4] = maps[4].max()  # an empty mask
    sketch = np.zeros((H, W), bool)
    sketch[H // 4:H // 2, W // 5:W * 3 // 5] = True  # a rectangle, as drawn in the UI
    yy, xx = np.mgrid[:H, :W]
    sketch |= (yy - H * 0.7) ** 2 + (xx - W * 0.5) ** 2 < (min(H, W) * 0.15) ** 2  # and a round part
    ref = loop_iou(sketch, maps, thresholds)
    for given in (maps, torch.from_numpy(maps)):  # numpy or torch maps, same result
        got = sketch_iou(sketch, given, thresholds)
        assert got.shape == (k,) and got.dtype == np.float32
        assert np.allclose(got, ref, atol=1e-6), np.abs(got - ref).max()
    assert ref[4] == 0.0 and ref.max() > 0.1 and (ref > 0).sum() > k // 4  # real overlaps
    # the whole image as the sketch: IoU = mask area / image area, an independent count
    full = np.ones((H, W), bool)
    area = unit_masks(maps[:20], thresholds[:20], iou_work_size((H, W))).mean((1, 2))
    assert np.allclose(sketch_iou(full, maps[:20], thresholds[:20]), area, atol=1e-6)
