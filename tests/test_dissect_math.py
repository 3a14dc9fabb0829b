"""The dissection math (deepminer.atlas.stats), each piece against an independent computation."""
import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from deepminer.atlas.stats import (TailQuantile, TopItems, coverage, influence_counts, iou_from_counts,
                                   pca_2d, quantile_from_tail, rank_by_frequency, sample_per_item,
                                   tail_length)


def _stream(tq: TailQuantile, data: np.ndarray, batch: int) -> None:
    """Feed ``data (K, items, P)`` in batches of items."""
    for i in range(0, data.shape[1], batch):
        tq.update(torch.from_numpy(data[:, i:i + batch]))


def test_tail_quantile_hand_worked():
    # 0..9, q=0.95: h = 0.95 * 9 = 8.55 -> 8 + 0.55 * (9 - 8) = 8.55; needs the top 10 - 8 = 2 values
    assert tail_length(10, 0.95) == 2
    tq = TailQuantile(1, 0.95, items=10, positions=1)
    for v in np.random.default_rng(0).permutation(10):
        tq.update(torch.tensor([[[float(v)]]]))
    assert tq.result().item() == pytest.approx(8.55)
    assert tq._tail.shape[1] <= 2 + 1  # only the tail is kept (plus nothing pending)


@pytest.mark.parametrize("q", [0.99, 0.995, 0.9, 0.5])
def test_tail_quantile_equals_numpy(q):
    rng = np.random.default_rng(1)
    k, items, p = 6, 300, 16
    data = rng.gamma(1.5, 1.0, size=(k, items, p)).astype(np.float32)
    data[2] = np.round(data[2])            # many ties
    data[3] = 0.0                          # a dead unit
    tq = TailQuantile(k, q, items=items, positions=p)
    _stream(tq, data, batch=7)
    got = tq.result().numpy()
    want = np.quantile(data.reshape(k, -1), q, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert tq.exact and tq.m == tail_length(items * p, q)
    assert tq._tail.shape[1] <= tq.m


def test_quantile_from_tail_direct():
    v = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0]])
    for q in (0.0, 0.3, 0.5, 0.74, 0.99):
        m = tail_length(5, q)
        tail = v.sort(dim=1, descending=True).values[:, :m]
        assert quantile_from_tail(tail, 5, q).item() == pytest.approx(np.quantile(v.numpy(), q))


def test_sampled_quantile_within_bound():
    """Over budget, each item gives s random positions; the estimate's rank in the full data is
    within the documented Hoeffding bound (delta = 1e-3)."""
    rng = np.random.default_rng(2)
    k, items, p, q = 4, 2000, 49, 0.99
    data = rng.lognormal(0.0, 1.0, size=(k, items, p)).astype(np.float32)
    budget = 4 * k * 300  # room for ~300 tail values per unit
    s = sample_per_item(p, items, k, q, budget)
    assert 1 <= s < p and 4 * k * tail_length(items * s, q) <= budget
    assert 4 * k * tail_length(items * (s + 1), q) > budget  # largest that fits
    tq = TailQuantile(k, q, items=items, positions=p, per_item=s, seed=3)
    _stream(tq, data, batch=64)
    est = tq.result().numpy()
    assert tq.n == items * s and not tq.exact
    eps = math.sqrt(math.log(2 / 1e-3) / (2 * items))
    flat = data.reshape(k, -1)
    ranks = (flat <= est[:, None]).mean(axis=1)
    assert np.all(np.abs(ranks - q) <= eps), (ranks, eps)
    assert np.all(np.abs(ranks - q) <= 0.003)  # in practice ~ sqrt(q(1-q)/n) = 0.0014


def test_top_items_matches_sort():
    rng = np.random.default_rng(4)
    k, n, cap, h, w = 5, 103, 9, 3, 4
    maps = torch.from_numpy(rng.random((n, k, h, w)).astype(np.float32))
    scores = maps.amax(dim=(2, 3))
    heap = TopItems(k, cap, (h, w))
    for i in range(0, n, 10):
        heap.update(scores[i:i + 10], torch.arange(i, min(i + 10, n)), maps[i:i + 10])
    s, idx, m = heap.result()
    assert s.shape == (k, cap) and m.shape == (k, cap, h, w)
    for unit in range(k):
        order = np.argsort(-scores[:, unit].numpy(), kind="stable")[:cap]
        np.testing.assert_array_equal(idx[unit].numpy(), order)
        np.testing.assert_allclose(s[unit].numpy(), scores[order, unit].numpy())
        np.testing.assert_allclose(m[unit].numpy(), maps[order, unit].numpy())


def test_influence_counts_hand_worked():
    max_act = torch.tensor([[1.0, 2.0, 3.0, 0.25],
                            [4.0, 0.0, 1.0, 1.0],
                            [1.0, 1.0, 1.0, 1.0]])
    weights = torch.tensor([[1.0, -1.0, 0.5, 2.0],    # class 0
                            [0.0, 1.0, 1.0, -1.0]])   # class 1
    pred = torch.tensor([0, 0, 1])
    counts, sums = influence_counts(max_act, weights, pred, top=2)
    # item 0 (class 0): infl = [1, -2, 1.5, 0.5] -> top2 = units 2, 0
    # item 1 (class 0): infl = [4, 0, 0.5, 2]   -> units 0, 3
    # item 2 (class 1): infl = [0, 1, 1, -1]    -> units 1, 2
    assert counts.tolist() == [[2, 0, 1, 1], [0, 1, 1, 0]]
    np.testing.assert_allclose(sums[0].numpy(), [5.0, -2.0, 2.0, 2.5])
    np.testing.assert_allclose(sums[1].numpy(), [0.0, 1.0, 1.0, -1.0])


def test_rank_and_coverage():
    counts = np.array([[3, 0, 3, 1], [0, 0, 0, 0]])
    sums = np.array([[1.0, 9.0, 2.0, 0.0], [0.0, 0.5, 0.2, 0.1]])
    order = rank_by_frequency(counts, sums)
    assert order[0].tolist() == [2, 0, 3, 1]       # tie 0/2 broken by summed influence
    assert order[1].tolist() == [1, 2, 3, 0]       # nothing counted: by influence
    cov = coverage(counts, order[:, :2], items=np.array([4, 0]), slots=2)
    assert cov[0] == pytest.approx(6 / 8) and math.isnan(cov[1])


def test_iou_from_counts_hand_worked():
    inter = np.array([[2.0, 0.0], [0.0, 0.0]])
    iou = iou_from_counts(inter, unit_area=[4.0, 0.0], concept_area=[3.0, 0.0])
    assert iou[0, 0] == pytest.approx(2 / 5) and iou[0, 1] == 0.0 and iou[1, 0] == 0.0 and iou[1, 1] == 0.0


def test_pca_2d_matches_sklearn():
    rng = np.random.default_rng(6)
    x = rng.random((40, 15)) @ np.diag(np.linspace(3, 0.1, 15))
    ours = pca_2d(x)
    ref = PCA(n_components=2).fit_transform(x)
    for j in range(2):  # equal up to the sign convention of the component
        sign = np.sign(ours[:, j] @ ref[:, j])
        np.testing.assert_allclose(ours[:, j], sign * ref[:, j], atol=1e-9)
    assert pca_2d(np.ones((1, 5))).shape == (1, 2)
