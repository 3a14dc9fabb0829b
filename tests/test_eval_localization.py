"""deepminer.evaluation.localization: geometry, scikit-learn equivalence, hand cases, and a
cross-check against Quantus 0.6.0 (installed --no-deps by scripts/setup.sh)."""
from __future__ import annotations

import importlib.util
import math

import cv2
import numpy as np
import pytest
from scipy.ndimage import binary_dilation
from sklearn.metrics import average_precision_score, roc_auc_score

from deepminer.errors import InputError
from deepminer.evaluation import localization as loc
from deepminer.explain.units import upsample_maps


def _case(seed: int, shape=(40, 56), *, levels: int | None = None):
    """A smooth-ish random map (quantised to ``levels`` values for ties), a blob lesion, a region."""
    rng = np.random.default_rng(seed)
    h, w = shape
    cells = rng.random((5, 7))
    sal = loc.to_image(cells, shape).astype(np.float64) + 0.05 * rng.random(shape)
    if levels:
        sal = np.round(sal * levels) / levels
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 23), rng.integers(3, 8)  # inside the region
    lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    region = xx < w - rng.integers(3, 15)  # a "breast" band: background on the right
    return sal, lesion, region


def _min_max(sal, region):
    """The documented normalisation, written out independently."""
    v = sal[region]
    return (sal - v.min()) / (v.max() - v.min())


# -- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cells, size", [((3, 4), (30, 40)), ((7, 5), (100, 63)), ((2, 2), (5, 9))])
def test_to_image_is_the_engine_geometry_and_cv2_agrees(cells, size):
    m = np.random.default_rng(0).random(cells)
    img = loc.to_image(m, size)
    assert img.shape == size and img.dtype == np.float32
    np.testing.assert_allclose(img, upsample_maps(m[None], size)[0], atol=1e-6)
    # cv2's INTER_LINEAR is half-pixel centred too (dsize is (W, H))
    np.testing.assert_allclose(img, cv2.resize(m, size[::-1], interpolation=cv2.INTER_LINEAR), atol=1e-5)


def test_to_image_cell_covers_its_block():
    m = np.zeros((4, 4))
    m[1, 2] = 1.0
    img = loc.to_image(m, (40, 40))
    # the peak is at the cell's centre block: rows [10, 20), cols [20, 30)
    assert np.unravel_index(img.argmax(), img.shape)[0] in (14, 15)
    assert np.unravel_index(img.argmax(), img.shape)[1] in (24, 25)


# -- AP and its curve ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed, levels", [(0, None), (1, None), (2, 8), (3, 4), (4, 20), (5, 2)])
def test_auprc_equals_sklearn_average_precision(seed, levels):
    sal, lesion, region = _case(seed, levels=levels)
    ours = loc.auprc(sal, lesion, region)
    ref = average_precision_score(lesion[region], sal[region])
    assert ours == pytest.approx(ref, abs=1e-12)
    # region=None: every pixel
    assert loc.auprc(sal, lesion) == pytest.approx(average_precision_score(lesion.ravel(), sal.ravel()), abs=1e-12)


def test_auprc_constant_map_is_the_prevalence_and_sklearn_agrees():
    _, lesion, region = _case(7)
    sal = np.full(lesion.shape, 0.3)
    prevalence = lesion[region].mean()
    assert loc.auprc(sal, lesion, region) == pytest.approx(prevalence)
    assert average_precision_score(lesion[region], sal[region]) == pytest.approx(prevalence)


def test_auprc_perfect_and_nan_without_lesion_in_region():
    _, lesion, region = _case(8)
    assert loc.auprc(lesion.astype(float), lesion, region) == 1.0
    outside = np.zeros_like(lesion)
    outside[:, -1] = True  # only in the background
    assert math.isnan(loc.auprc(np.random.default_rng(0).random(lesion.shape), outside, region))


@pytest.mark.parametrize("seed, levels", [(0, None), (3, 4)])
def test_roc_auc_equals_sklearn(seed, levels):
    sal, lesion, region = _case(seed, levels=levels)
    assert loc.roc_auc(sal, lesion, region) == pytest.approx(roc_auc_score(lesion[region], sal[region]), abs=1e-12)


def test_pr_curve_is_interpolated_precision():
    # 6 pixels by score: P N P N N P -> (recall, precision) = (1/3, 1), (2/3, 2/3), (1, 1/2)
    sal = np.array([[6.0, 5, 4, 3, 2, 1]])
    lesion = np.array([[1, 0, 1, 0, 0, 1]], bool)
    p = loc.pr_curve(sal, lesion, None, recall_grid=np.array([0.0, 0.2, 1 / 3, 0.5, 0.7, 1.0]))
    np.testing.assert_allclose(p, [1, 1, 1, 2 / 3, 1 / 2, 1 / 2])
    sal2, lesion2, region2 = _case(2, levels=8)
    curve = loc.pr_curve(sal2, lesion2, region2)
    assert curve.shape == (101,) and np.all(np.diff(curve) <= 1e-12)  # non-increasing
    assert lesion2[region2].mean() <= curve[-1] <= curve[0] <= 1.0  # full recall: at least the prevalence


# -- the tissue-prior baseline -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_tissue_prior_is_the_full_resolution_blur_within_0_005(seed):
    """The prior blurred at a working resolution vs SciPy's Gaussian (reflect) of every original
    pixel, then the mean over each cell: equal within 0.005 on phantom breast masks of several sizes."""
    from scipy.ndimage import gaussian_filter

    from deepminer.data.phantoms import render_phantom
    from deepminer.data.tissue import tissue_mask
    from deepminer.evaluation.methods import TISSUE_PRIOR_SIGMA, tissue_prior_map

    height = [300, 512, 700, 1024][seed]
    tissue = tissue_mask(render_phantom(seed, 0, height).image / 4095.0)
    h, w = tissue.shape
    full = gaussian_filter(tissue.astype(np.float64), TISSUE_PRIOR_SIGMA * max(h, w), mode="reflect", truncate=4.0)
    for grid in ((h // 16, w // 16), (h // 32, w // 32), (7, 5)):
        ref = cv2.resize(full.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
        got = tissue_prior_map(tissue, grid)
        assert got.shape == grid and 0.2 < float(got.max()) <= 1.0
        assert np.abs(got - ref).max() < 0.005, (height, grid)


# -- pointing game -------------------------------------------------------------------------------

def test_pointing_game_tolerance_is_euclidean_in_pixels():
    lesion = np.zeros((60, 60), bool)
    lesion[20:30, 20:30] = True
    # nearest lesion pixel of (25, 39) is (25, 29): 10 px; of (40, 40) it is (29, 29): 11 * sqrt(2) = 15.56 px
    for (r, c), tol, hit in [((25, 25), 0, True), ((25, 39), 10, True), ((25, 40), 10, False),
                             ((40, 40), 15.6, True), ((40, 40), 15.5, False), ((25, 44), 15, True),
                             ((40, 40), 15, False)]:
        sal = np.zeros((60, 60))
        sal[r, c] = 1.0
        assert loc.pointing_game(sal, lesion, tolerance_px=tol) is hit, (r, c, tol)


def test_pointing_game_peak_within_region_and_ties():
    lesion = np.zeros((40, 40), bool)
    lesion[5:10, 5:10] = True
    region = np.ones((40, 40), bool)
    region[:, 30:] = False
    sal = np.zeros((40, 40))
    sal[35, 35] = 9.0  # the global peak, in the background: ignored
    sal[7, 7] = 1.0
    assert loc.pointing_game(sal, lesion, region, tolerance_px=0)
    assert not loc.pointing_game(sal, lesion, None, tolerance_px=0)
    sal2 = np.zeros((40, 40))
    sal2[7, 7] = sal2[25, 25] = 1.0  # a tie: one maximum inside is a hit
    assert loc.pointing_game(sal2, lesion, tolerance_px=0)
    with pytest.raises(InputError, match="empty"):
        loc.pointing_game(sal2, np.zeros((40, 40), bool))


@pytest.mark.parametrize("seed", range(12))
def test_pointing_game_equals_the_dilated_lesion_on_every_path(seed):
    """The hit test read three ways (peak-to-lesion distances, only the lesion pixels near the peaks,
    the shared distance transform for many tied peaks x a large lesion) against its definition
    written out independently: a maximal region pixel inside the lesion dilated by a Euclidean disc."""
    rng = np.random.default_rng(seed)
    h, w = 300, 260
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    radius = [3, 40, 150][seed % 3]  # a small lesion, a large one (EDT with many ties), one past the edges
    lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    region = xx < w - rng.integers(0, 40)
    levels = [None, 3, 2][seed % 3 if seed < 9 else 0]  # quantised: hundreds to thousands of tied peaks
    sal = loc.to_image(rng.random((6, 5)), (h, w)).astype(np.float64)
    if levels:
        sal = np.round(sal * levels) / levels
    tol = float(rng.choice([0.0, 7.5, 15.0]))
    v = np.where(region, sal, -np.inf)
    peaks = region & (v == v.max())
    disc = (np.mgrid[-16:17, -16:17] ** 2).sum(0) <= tol ** 2
    expected = bool((binary_dilation(lesion, structure=disc) & peaks).any())
    assert loc.pointing_game(sal, lesion, region, tolerance_px=tol) is expected


# -- Otsu IoU / Dice, relevance mass, the dict --------------------------------------------------

def test_otsu_iou_dice_by_hand():
    from skimage.filters import threshold_otsu

    sal, lesion, region = _case(11)
    norm = _min_max(sal, region)
    pred = region & (norm > threshold_otsu(norm[region]))
    truth = lesion & region
    inter, union = (pred & truth).sum(), (pred | truth).sum()
    iou, dice = loc.otsu_iou_dice(sal, lesion, region)
    assert iou == pytest.approx(inter / union) and dice == pytest.approx(2 * inter / (pred.sum() + truth.sum()))
    assert dice == pytest.approx(2 * iou / (1 + iou))
    # a two-level map equal to the lesion: perfect
    assert loc.otsu_iou_dice(np.where(lesion, 5.0, 1.0), lesion, region) == (1.0, 1.0)


def test_relevance_mass_by_hand_and_edge_cases():
    sal, lesion, region = _case(12)
    norm = _min_max(sal, region)
    assert loc.relevance_mass(sal, lesion, region) == pytest.approx(norm[lesion & region].sum() / norm[region].sum())
    assert loc.relevance_mass(np.where(lesion, 2.0, -1.0), lesion, region) == 1.0  # all mass inside
    # a constant map spreads its mass evenly: the lesion's area share
    assert loc.relevance_mass(np.ones(lesion.shape), lesion, region) == pytest.approx(lesion[region].mean())


def test_localization_metrics_dict_and_nan_without_lesion():
    sal, lesion, region = _case(13)
    m = loc.localization_metrics(sal, lesion, region)
    assert set(m) == {"auprc", "pointing", "iou", "dice", "relevance_mass"}
    assert m["auprc"] == loc.auprc(sal, lesion, region) and m["pointing"] in (0.0, 1.0)
    assert all(isinstance(v, float) for v in m.values())
    empty = loc.localization_metrics(sal, np.zeros_like(lesion), region)
    assert all(math.isnan(v) for v in empty.values())


def test_inputs_validated_in_one_line():
    sal, lesion, region = _case(0)
    with pytest.raises(InputError, match=r"saliency \(40, 56\), lesion \(40, 55\)") as e:
        loc.auprc(sal, lesion[:, :-1], region)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="region mask is empty"):
        loc.relevance_mass(sal, lesion, np.zeros_like(region))
    with pytest.raises(InputError, match="NaN"):
        loc.auprc(np.where(lesion, np.nan, 0.0), lesion, region)
    with pytest.raises(InputError, match="to_image"):
        loc.to_image(np.zeros((2, 2, 2)), (4, 4))


# -- Quantus 0.6.0 cross-check -------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantus():
    # Skip only when quantus is truly absent (scripts/setup.sh installs it, so `make test` runs this);
    # installed but broken (a missing dependency of the --no-deps install) fails loudly instead.
    if importlib.util.find_spec("quantus") is None:
        pytest.skip("quantus is not installed (scripts/setup.sh installs quantus==0.6.0 --no-deps)")
    import quantus as q

    assert q.__version__ == "0.6.0"
    return q


def _run(metric, a: np.ndarray, s: np.ndarray) -> list[float]:
    """One Quantus metric on a batch of precomputed maps, (N, 1, H, W), no model, no explain_func.
    ``normalise=False, abs=False``: Quantus sees exactly the array we give it."""
    x = np.zeros(a.shape)
    m = metric(normalise=False, abs=False, disable_warnings=True)
    return [float(v) for v in m(model=None, x_batch=x, y_batch=np.zeros(len(a), int), a_batch=a,
                                s_batch=s.astype(float), channel_first=True)]


CASES = [(seed, levels) for seed in range(6) for levels in (None, 4)]


def test_pointing_game_matches_quantus(quantus):
    # Quantus's PointingGame has no tolerance and no region: a hit when any maximal pixel of the map
    # is in s. So we hand it (a) the map with the background pushed below the region's minimum
    # (its argmax is then our argmax over the region) and (b) the lesion dilated by a Euclidean
    # disc of radius tolerance_px (binary_dilation, independent of our distance transform).
    for tol in (0.0, 4.0, 15.0):
        r = int(tol)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = yy ** 2 + xx ** 2 <= tol ** 2
        maps, masks, ours = [], [], []
        for seed, levels in CASES:
            sal, lesion, region = _case(seed, levels=levels)
            maps.append(np.where(region, sal, sal.min() - 1.0))
            masks.append(binary_dilation(lesion, structure=disc))
            ours.append(float(loc.pointing_game(sal, lesion, region, tolerance_px=tol)))
        theirs = _run(quantus.PointingGame, np.stack(maps)[:, None], np.stack(masks)[:, None])
        assert ours == theirs, tol
        if tol == 0.0:
            assert 0 < sum(ours) < len(ours)  # both outcomes exercised


def test_relevance_mass_matches_quantus(quantus):
    # Quantus's RelevanceMassAccuracy = sum(a * s) / sum(a) over all pixels. We hand it our
    # documented normalisation written out here (min-max over the region) with the background set
    # to 0 (no mass outside the region), and s = lesion & region.
    maps, masks, ours = [], [], []
    for seed, levels in CASES:
        sal, lesion, region = _case(seed, levels=levels)
        maps.append(np.where(region, _min_max(sal, region), 0.0))
        masks.append(lesion & region)
        ours.append(loc.relevance_mass(sal, lesion, region))
    theirs = _run(quantus.RelevanceMassAccuracy, np.stack(maps)[:, None], np.stack(masks)[:, None])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_roc_auc_matches_quantus_and_auprc_matches_sklearn(quantus):
    # Quantus's AUC is the ROC AUC (sklearn roc_curve + auc) of the map's pixels against the mask
    # over ALL pixels; it has no average precision. So: our roc_auc (sharing auprc's sort/tie
    # counting) == quantus.AUC, with region=None on the full image, and with a region by handing
    # Quantus only the region's pixels as a (1, P) "image"; our auprc == sklearn AP on those pixels.
    # (Normalisation is irrelevant: both are invariant to increasing maps.)
    full_a, full_s, full_ours = [], [], []
    for seed, levels in CASES:
        sal, lesion, region = _case(seed, levels=levels)
        full_a.append(sal)
        full_s.append(lesion)
        full_ours.append(loc.roc_auc(sal, lesion))
        theirs = _run(quantus.AUC, sal[region][None, None, None], lesion[region][None, None, None])
        assert loc.roc_auc(sal, lesion, region) == pytest.approx(theirs[0], abs=1e-12)
        assert loc.auprc(sal, lesion, region) == pytest.approx(
            average_precision_score(lesion[region], sal[region]), abs=1e-12)
    theirs = _run(quantus.AUC, np.stack(full_a)[:, None], np.stack(full_s)[:, None])
    np.testing.assert_allclose(full_ours, theirs, atol=1e-12)
