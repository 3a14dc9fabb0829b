"""Deletion/insertion curves (deepminer.evaluation.faithfulness) on a model whose relevant pixels are known."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from deepminer.errors import InputError
from deepminer.evaluation.faithfulness import auc, deletion_insertion, schedule
from deepminer.models.fcn import FCN, GAPHead

CELL = 8


class SquareEnergy(nn.Module):
    """One unit: the mean of x**2 over each 8x8 cell, kept only on the cells of a known square.
    Blur lowers x**2 on a high-contrast texture, so the class-1 logit falls when the square's
    own pixels are blurred, and only then."""

    def __init__(self, square: np.ndarray):
        super().__init__()
        self.register_buffer("square", torch.from_numpy(square.astype(np.float32))[None, None])
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x[:, 0].clone())
        return F.avg_pool2d(x[:, :1] ** 2, CELL) * self.square


def square_model(grid: tuple[int, int], cells: list[tuple[int, int]], gain: float = 20.0, bias: float = -7.0) -> FCN:
    square = np.zeros(grid, bool)
    for i, j in cells:
        square[i, j] = True
    head = GAPHead(1, 3)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
        head.fc.weight[1, 0, 0, 0] = gain * square.size / square.sum()  # logit 1 = gain * mean over the square
        head.fc.bias[1] = bias
    # identity normalisation: the features see the grey image itself
    return FCN(SquareEnergy(square), head, arch="toy", classes=("normal", "benign", "malignant"),
               layer="energy", num_units=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def prob1(model: FCN, img: np.ndarray) -> float:
    with torch.inference_mode():
        return float(torch.softmax(model(torch.from_numpy(img)[None, None].float()), 1)[0, 1])


SQUARE = [(2, 5), (2, 6), (3, 5), (3, 6)]


@pytest.fixture
def toy():
    img = np.full((64, 64), 0.1, np.float32)  # 8x8 cells; the square: a checkerboard on 4 cells
    yy, xx = np.mgrid[16:32, 40:56]
    img[16:32, 40:56] = np.where((yy + xx) % 2 == 1, 0.95, 0.05)
    return square_model((8, 8), SQUARE), img


def test_square_first_vs_last(toy):
    model, img = toy
    tissue = np.ones(img.shape, bool)
    good = np.arange(64, dtype=float).reshape(8, 8) * -1.0  # ties none; the square on top
    bad = good.copy()
    for i, j in SQUARE:
        good[i, j] = 100.0
        bad[i, j] = -1000.0
    g = deletion_insertion(model, img, good, 1, tissue, max_side=None)
    b = deletion_insertion(model, img, bad, 1, tissue, max_side=None)
    p_orig = prob1(model, img)
    p_blur = prob1(model, ndimage.gaussian_filter(img, 0.5 * CELL, mode="reflect"))
    assert p_orig > 0.7 and p_blur < 0.1  # the toy is sensitive to the square's texture only
    assert g.blur_sigma == 0.5 * CELL
    for r in (g, b):
        np.testing.assert_allclose(r.fractions, np.linspace(0, 1, 11))
        # end points: the original and the blurred image
        assert r.deletion[0] == pytest.approx(p_orig, abs=1e-6)
        assert r.insertion[-1] == pytest.approx(p_orig, abs=1e-6)
        assert r.deletion[-1] == pytest.approx(p_blur, abs=1e-5)
        assert r.insertion[0] == pytest.approx(p_blur, abs=1e-5)
        assert r.forwards <= 20
    # square first: the probability falls at the first step; square last: only at the end
    np.testing.assert_allclose(g.deletion[1:], p_blur, atol=1e-5)
    np.testing.assert_allclose(b.deletion[:-1], p_orig, atol=1e-6)
    np.testing.assert_allclose(g.insertion[1:], p_orig, atol=1e-6)
    np.testing.assert_allclose(b.insertion[:-1], p_blur, atol=1e-5)
    assert g.deletion_auc < 0.15 < 0.6 < b.deletion_auc
    assert g.insertion_auc > 0.6 > 0.15 > b.insertion_auc
    assert g.deletion_auc == pytest.approx(auc(g.fractions, g.deletion))
    assert g.deletion_auc == pytest.approx(0.05 * (p_orig + p_blur) + 0.9 * p_blur, abs=1e-5)


HAND_TISSUE = {5: (5, 8), 0: (5, 6), 10: (4, 5), 15: (2, 5)}  # cell -> tissue block: 40, 30, 20, 10 px


def hand_case():
    tissue = np.zeros((32, 32), bool)  # 4x4 cells of 8x8 px
    for cell, (rows, cols) in HAND_TISSUE.items():
        i, j = divmod(cell, 4)
        tissue[i * 8:i * 8 + rows, j * 8:j * 8 + cols] = True
    cmap = np.zeros((4, 4))
    cmap.flat[3] = 9.0  # the top cell holds no tissue: skipped
    cmap.flat[5] = 8.0
    cmap.flat[0] = cmap.flat[10] = 5.0  # a tie: cell 0 before cell 10
    cmap.flat[15] = 1.0
    return tissue, cmap


def test_schedule_counts_breast_area():
    tissue, cmap = hand_case()
    order, counts, achieved = schedule(cmap, tissue, 10)
    assert order.tolist() == [5, 0, 10, 15]
    # cumulative tissue 40, 70, 90, 100 of 100 px: step k needs k*10 px
    assert counts.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4]
    np.testing.assert_allclose(achieved, [0, .4, .4, .4, .4, .7, .7, .7, .9, .9, 1.0])
    assert schedule(cmap, tissue, 4)[1].tolist() == [0, 1, 2, 3, 4]  # 25 px steps: 40, 70, 90, 100


def test_hand_case_pixels_and_forwards():
    tissue, cmap = hand_case()
    model = square_model((4, 4), [(0, 0), (1, 1)])
    rng = np.random.default_rng(0)
    img = rng.uniform(0.0, 1.0, (32, 32)).astype(np.float32)
    r = deletion_insertion(model, img, cmap, 1, tissue, max_side=None, blur_sigma=2.0)
    assert r.cells.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4]
    # unique images: original, blurred, deletion of 1/2/3 cells, insertion of 1/2/3 cells
    assert r.forwards == 8
    seen = torch.cat(model.features.seen).numpy()
    assert len(seen) == 8
    blurred = ndimage.gaussian_filter(img, 2.0, mode="reflect")
    cell = np.arange(32)[:, None] // 8 * 4 + np.arange(32)[None, :] // 8

    def expect(blur_cells):
        return np.where(np.isin(cell, blur_cells), blurred, img)

    order = [5, 0, 10, 15]
    expected = [expect([])] + [expect(order)] + [expect(order[:n]) for n in (1, 2, 3)] \
        + [expect(order[n:]) for n in (1, 2, 3)]
    for e in expected:  # every expected image was passed, exactly once
        hits = [k for k, s in enumerate(seen) if np.allclose(s, e, atol=1e-6)]
        assert len(hits) == 1
    # cells without tissue (1, 2, 3, ...) are never touched
    untouched = ~np.isin(cell, order)
    assert all(np.array_equal(s[untouched], img[untouched]) for s in seen)


def test_real_model_matches_engine_probability():
    from deepminer.explain.engine import explain_image
    from deepminer.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False)
    model.meta = {"patch_size": 64}  # the most-abnormal-window rule is active on a 160x256 input
    rng = np.random.default_rng(1)
    img = ndimage.gaussian_filter(rng.uniform(0, 1, (320, 200)), 3).astype(np.float32)
    img = (img - img.min()) / (img.max() - img.min())
    tissue = np.zeros(img.shape, bool)
    tissue[20:300, :150] = True
    expl = explain_image(model, img, max_side=256)
    target = int(np.argmax(list(expl.probabilities.values())))
    cmap = expl.cam[target]
    model.train()
    r = deletion_insertion(model, img, cmap, target, tissue, max_side=256)
    assert model.training  # restored
    assert r.deletion[0] == pytest.approx(list(expl.probabilities.values())[target], abs=1e-5)
    assert r.insertion[-1] == pytest.approx(r.deletion[0], abs=1e-6)
    assert r.forwards <= 20
    assert np.all(np.diff(r.tissue_fraction) >= 0) and np.all(r.tissue_fraction >= r.fractions - 1e-12)
    with pytest.raises(InputError, match="cell_map"):
        deletion_insertion(model, img, cmap[:-1], target, tissue, max_side=256)
    with pytest.raises(InputError, match="tissue"):
        deletion_insertion(model, img, cmap, target, np.zeros_like(tissue), max_side=256)
