"""How far an image lies from the images a model was trained on: the out-of-domain score.

Two kinds of ``domain.pt``, both read by :func:`load_domain`: the **guard** (:class:`DomainGuard`,
kind ``frozen-trunk``, format 2, the default of ``deepminer domain-fit``; second half of this
module): frozen backbone features and image statistics judged at the model's own scale, fitted on
fresh phantoms of every generator size; and the older **unit-max summary** (:class:`DomainModel`,
format 1), described here:

The score is the **Mahalanobis distance** of the image's pooled last-layer features from the
Gaussian fitted to the training images' features (Lee et al. 2018, "A Simple Unified Framework for
Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS; one class-agnostic
Gaussian, the last layer only, no input pre-processing). The features are the engine's own
``unit_max`` [K] (each unit's maximum activation over the image: the pooling DeepMiner's influence
uses), so the score costs no second forward pass: one ``(d, K)`` matrix product per image.

With about 700 fit images and K = 1280 units the sample covariance is singular, so it is shrunk
(Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance matrices",
``sklearn.covariance.LedoitWolf``). To keep the file small, the shrunk covariance keeps its top
``d`` eigen-directions exactly and replaces the remaining ``K - d`` eigenvalues by their mean (the
isotropic residual of probabilistic PCA, Tipping & Bishop 1999); with ``d = K`` the score is exactly
the Ledoit-Wolf Mahalanobis distance. In eigen-coordinates ``p = V (x - mu)``:

``score(x) = sqrt( sum_i p_i^2 / lambda_i + (||x - mu||^2 - ||p||^2) / sigma_res^2 )``.

The threshold is a stated percentile (default 99) of the validation images' scores: an image whose
score is above it lies farther out than 99% of held-out in-domain images. :class:`DomainModel` is
what ``deepminer domain-fit`` writes (``domain.pt``: tensors + plain metadata, loadable with
``torch.load(weights_only=True)``) and what the server loads next to the model
(:meth:`DomainModel.check_model` refuses a file fitted for other weights).

No Streamlit, no TorchServe; numpy here, torch only to read/write the file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.atomic import atomic_file
from deepminer.errors import InputError
from deepminer.model_folder import DOMAIN

METHOD = "mahalanobis"  #: the score's name in ``input.domain.method``
FEATURE = "unit_max"  #: the pooled features: the explanation's per-unit max activation
TRANSFORMS = ("sqrt", "none")  #: applied to each feature before the Gaussian (sqrt: variance-stabilising)
DEFAULT_TRANSFORM = "sqrt"
MIN_TISSUE = 0.01  #: an image whose tissue mask keeps less than this fraction holds no breast: out of domain
FILE_NAME = DOMAIN  #: the file beside ``model.pt`` (and in the .mar) the server loads
DEFAULT_PERCENTILE = 99.0  #: threshold = this percentile of the validation scores
DEFAULT_COMPONENTS = 256  #: eigen-directions kept exactly (the rest: their mean variance)
FORMAT = 1


def pooled_features(exp: Any) -> np.ndarray:
    """The features the score is computed on, from an explanation (or anything with
    ``unit_max``): float64 [K]."""
    return np.asarray(exp.unit_max, dtype=np.float64).reshape(-1)


@dataclass
class DomainModel:
    """A fitted feature summary and threshold. ``components`` ``(d, K)`` orthonormal rows,
    ``variances`` [d] their variances, ``residual_variance`` the variance of every other direction."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    threshold: float
    percentile: float = DEFAULT_PERCENTILE
    weights_sha256: str = ""
    fit: dict[str, Any] = field(default_factory=dict)
    method: str = METHOD
    feature: str = FEATURE
    transform: str = "none"
    min_tissue: float = MIN_TISSUE

    @property
    def num_units(self) -> int:
        return int(self.mean.shape[0])

    def transformed(self, features: Any) -> np.ndarray:
        """``features`` (raw ``unit_max``) as the Gaussian sees them (:attr:`transform`)."""
        return apply_transform(features, self.transform)

    # -- the score ----------------------------------------------------------------------------
    def score(self, features: Any) -> np.ndarray | float:
        """Mahalanobis distance of the raw ``features`` [K] (a float) or ``(n, K)`` (an array [n]),
        after :attr:`transform`."""
        x = self.transformed(features)
        one = x.ndim == 1
        x = np.atleast_2d(x)
        if x.shape[1] != self.num_units:
            raise InputError(f"domain: {x.shape[1]} features for a summary of {self.num_units} units")
        z = x - self.mean
        p = z @ self.components.T
        resid = np.maximum((z * z).sum(1) - (p * p).sum(1), 0.0)
        d2 = (p * p / self.variances).sum(1) + resid / self.residual_variance
        d = np.sqrt(np.maximum(d2, 0.0))
        return float(d[0]) if one else d

    def verdict(self, features: Any, tissue_fraction: float | None = None) -> dict[str, Any]:
        """``input.domain`` of the API: ``method``, ``score``, ``threshold``, ``percentile``,
        ``in_domain`` and ``reason`` (None when in domain). Out of domain when the score is above
        the threshold, or when ``tissue_fraction`` (the tissue mask's share of the image; None: not
        known) is below :attr:`min_tissue`: an image without a breast (a blank page, noise) is
        outside the domain of a mammogram model whatever its features."""
        s = float(self.score(np.asarray(features).reshape(-1)))
        reason = None
        if tissue_fraction is not None and float(tissue_fraction) < self.min_tissue:
            reason = f"no breast tissue found (tissue fraction {float(tissue_fraction):.4f} < {self.min_tissue:g})"
        elif s > self.threshold:
            reason = f"score above the threshold ({s:.4g} > {float(self.threshold):.4g})"
        return {"method": self.method, "score": round(s, 3), "threshold": round(float(self.threshold), 3),
                "percentile": float(self.percentile), "in_domain": reason is None, "reason": reason}

    def judge(self, *, model: Any = None, pixels: Any = None, region: Any = None,
              tissue_fraction: float | None = None, unit_max: Any = None, spacing_mm: float | None = None,
              side: int | None = None) -> dict[str, Any]:
        """What the server calls (the signature of :meth:`DomainGuard.judge`): this summary only
        reads the explanation's ``unit_max`` and the tissue fraction."""
        return self.verdict(unit_max, tissue_fraction)

    def check_model(self, weights_sha256: str, *, model: Any = None, source: str = "domain file") -> None:
        """One-line :class:`InputError` when this summary was fitted for other weights (``model``:
        not used; the guard's check reads it)."""
        if self.weights_sha256 and weights_sha256 and self.weights_sha256 != weights_sha256:
            raise InputError(f"{source}: fitted for model weights {self.weights_sha256[:12]}, this model is "
                             f"{weights_sha256[:12]}; refit it with 'deepminer domain-fit'")

    # -- the file -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (float32 tensors + plain metadata; ``torch.load(weights_only=True)``)."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"format": FORMAT, "method": self.method, "feature": self.feature, "transform": self.transform,
                "min_tissue": float(self.min_tissue),
                "mean": torch.from_numpy(self.mean.astype(np.float32)),
                "components": torch.from_numpy(np.ascontiguousarray(self.components, dtype=np.float32)),
                "variances": torch.from_numpy(self.variances.astype(np.float32)),
                "residual_variance": float(self.residual_variance), "threshold": float(self.threshold),
                "percentile": float(self.percentile), "weights_sha256": str(self.weights_sha256),
                "fit": dict(self.fit)}
        with atomic_file(path) as fh:
            torch.save(blob, fh)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, weights_sha256: str | None = None) -> DomainModel:
        """Read a file :meth:`save` wrote; with ``weights_sha256``, refuse one fitted for other
        weights. Anything else than a domain file: a one-line :class:`InputError`."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such domain file")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(blob, Mapping) and blob.get("kind"):
                raise ValueError(f"a {blob.get('kind')!r} guard: read it with deepminer.domain.load_domain")
            if not isinstance(blob, Mapping) or blob.get("method") != METHOD:
                raise ValueError("not a deepminer domain file")
            out = cls(mean=blob["mean"].double().numpy(), components=blob["components"].double().numpy(),
                      variances=blob["variances"].double().numpy(),
                      residual_variance=float(blob["residual_variance"]), threshold=float(blob["threshold"]),
                      percentile=float(blob["percentile"]), weights_sha256=str(blob.get("weights_sha256", "")),
                      fit=dict(blob.get("fit") or {}), method=str(blob["method"]),
                      feature=str(blob.get("feature", FEATURE)), transform=str(blob.get("transform", "none")),
                      min_tissue=float(blob.get("min_tissue", MIN_TISSUE)))
            if out.transform not in TRANSFORMS:
                raise ValueError(f"unknown transform {out.transform!r}")
        except Exception as err:  # noqa: BLE001 - any unreadable file is one bad input
            raise InputError(f"{path}: not a deepminer domain file ({type(err).__name__}: {err})") from None
        if weights_sha256 is not None:
            out.check_model(weights_sha256, source=str(path))
        return out


def shrunk_covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(mean [K], covariance (K, K), shrinkage)``: the Ledoit-Wolf estimate of ``x`` ``(n, K)``."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(store_precision=False).fit(x)
    return lw.location_, lw.covariance_, float(lw.shrinkage_)


def apply_transform(features: Any, transform: str) -> np.ndarray:
    """``sqrt`` (of the non-negative activations; negative ones count as 0) or ``none``; float64."""
    x = np.asarray(features, dtype=np.float64)
    if transform == "sqrt":
        return np.sqrt(np.maximum(x, 0.0))
    if transform != "none":
        raise InputError(f"domain: unknown transform {transform!r} (known: {', '.join(TRANSFORMS)})")
    return x


def fit_domain(train: Any, val: Any, *, percentile: float = DEFAULT_PERCENTILE,
               components: int = DEFAULT_COMPONENTS, weights_sha256: str = "", transform: str = "none",
               fit: Mapping[str, Any] | None = None) -> DomainModel:
    """Fit the summary on ``train`` ``(n, K)`` raw features (``transform`` applied first) and set
    the threshold at ``percentile`` of the ``val`` ``(m, K)`` scores (:mod:`module docs
    <deepminer.domain>`)."""
    x = apply_transform(train, transform)
    v = np.asarray(val, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"domain fit: need at least 2 training feature rows, got shape {x.shape}")
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != x.shape[1]:
        raise InputError(f"domain fit: need validation features (m, {x.shape[1]}), got shape {v.shape}")
    if not 0 < percentile <= 100:
        raise InputError(f"domain fit: the percentile must be in (0, 100], got {percentile}")
    k = x.shape[1]
    d = max(1, min(int(components), k))
    mean, cov, shrinkage = shrunk_covariance(x)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    rest = evals[d:]
    residual = float(rest.mean()) if rest.size else float(evals[-1])
    model = DomainModel(mean=mean, components=evecs[:, :d].T.copy(), variances=evals[:d].copy(),
                        residual_variance=max(residual, 1e-12), threshold=0.0, percentile=float(percentile),
                        weights_sha256=weights_sha256, transform=transform)
    train_scores = np.asarray(model.score(train))
    val_scores = np.asarray(model.score(v))
    model.threshold = float(np.percentile(val_scores, percentile))
    model.fit = {**dict(fit or {}), "train_images": int(x.shape[0]), "val_images": int(v.shape[0]),
                 "units": int(k), "components": int(d), "transform": transform, "shrinkage": round(shrinkage, 6),
                 "train_score_median": round(float(np.median(train_scores)), 3),
                 "val_score_median": round(float(np.median(val_scores)), 3),
                 "val_score_max": round(float(val_scores.max()), 3)}
    return model


def describe(domain: Mapping[str, Any] | None, trained_on: str | None = None) -> str:
    """One line for a person: ``input.domain`` (None: no summary) and what the model was trained on."""
    if not domain:
        return "domain: not checked (no domain summary for this model)"
    where = f"; trained on {trained_on}" if trained_on else ""
    score, thr = float(domain["score"]), float(domain["threshold"])
    if domain.get("in_domain"):
        return f"domain: in the model's training domain (score {score:.4g} <= threshold {thr:.4g}{where})"
    why = domain.get("reason") or ""
    numbers = (f"{why}; score {score:.4g}, threshold {thr:.4g}" if why.startswith("no breast")
               else f"score {score:.4g} > threshold {thr:.4g}")
    return f"domain: OUT of the model's training domain ({numbers}{where}): its output on this image is not meaningful"


def feature_rows(rows: Sequence[Any]) -> np.ndarray:
    """Stack per-image features (each [K]) into ``(n, K)`` float64."""
    return np.stack([np.asarray(r, dtype=np.float64).reshape(-1) for r in rows])


def image_features(service: Any, images: Sequence[Any], *, max_side: int | None = None,
                   desc: str = "features", progress: bool = True) -> np.ndarray:
    """``(n, K)`` pooled features of ``images`` (paths or bytes) through ``service`` (an
    :class:`~deepminer.explain.service.ExplainService`): the server's own path (decode, tissue
    mask, the engine at ``max_side``, None: the service's default), so fit and serving agree."""
    from tqdm import tqdm

    from deepminer.options import ExplainOptions

    opts = ExplainOptions.build(unit_maps="none", top_units=1, max_side=max_side)
    rows = []
    for img in tqdm(images, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        data = img if isinstance(img, (bytes, bytearray)) else Path(img).read_bytes()
        name = "image" if isinstance(img, (bytes, bytearray)) else str(img)
        rows.append(pooled_features(service.explain(bytes(data), opts, name=name)))
    return feature_rows(rows)


def stand_in(num_units: int, components: int = DEFAULT_COMPONENTS, seed: int = 0) -> DomainModel:
    """A summary of the default shape with random orthonormal directions (for timing the score
    where a model has no ``domain.pt``: its cost depends only on the shapes); ``fit.source`` says so."""
    rng = np.random.default_rng(seed)
    d = max(1, min(int(components), int(num_units)))
    q, _ = np.linalg.qr(rng.standard_normal((int(num_units), d)))
    return DomainModel(mean=np.zeros(int(num_units)), components=q.T.copy(), variances=np.ones(d),
                       residual_variance=1.0, threshold=1.0, fit={"source": "stand-in"})


# ==================================================================================================
# The frozen-trunk guard (format 2, kind "frozen-trunk"): features that survive fine-tuning
# ==================================================================================================
#
# The unit_max summary above lives on the fine-tuned last layer, which forgets what tells a real
# mammogram from a phantom; ImageNet's whole network (probe) keeps it but was fitted at one scale.
# The guard below describes an image by (a) the channel means and log-stds, over the breast's cells,
# of two frozen stages of the model's own backbone (EfficientNet-Lite0 ``net.blocks.2`` and
# ``net.blocks.4``: before ``net.blocks.5``, the first stage a whole-image model fine-tunes) and
# (b) simple image statistics (intensity moments inside the breast, tissue fraction, background,
# high-frequency noise, edges, how the breast touches the borders), all computed at the model's own
# scale (:func:`guard_side`), and scores them with the same Ledoit-Wolf Mahalanobis distance on
# standardised features. It is fitted on fresh phantoms of several generator sizes, so the scale of
# an in-domain image does not move it out. The file records a hash of the frozen layers it used
# (:func:`trunk_sha256`): a model whose layers differ is refused, one whose fine-tuned layers
# alone differ (a retrained head) keeps the same guard.

GUARD_KIND = "frozen-trunk"  #: ``kind`` of a guard file
GUARD_METHOD = "mahalanobis-frozen-trunk"  #: ``input.domain.method`` of the guard
GUARD_FORMAT = 2
GUARD_LAYERS = ("net.blocks.2", "net.blocks.4")  #: frozen stages whose activations are pooled
GUARD_PERCENTILE = 99.5  #: threshold = this percentile of the held-out phantoms' scores
GUARD_SIZES = (512, 768, 1024, 1536)  #: phantom generator sizes (image height, px) it is fitted on
GUARD_FOLDS = 3  #: the threshold is a percentile of out-of-fold scores over this many folds
STAT_NAMES = ("tissue_fraction", "breast_mean", "breast_std", "breast_skew", "breast_kurtosis", "breast_q05",
              "breast_q50", "breast_q95", "breast_saturated", "background_mean", "background_std",
              "background_q99", "noise_level", "gradient_mean", "edge_density", "border_min", "border_low",
              "border_high", "border_max")  #: the image statistics, in order
_STD_FLOOR = 1e-3  #: a feature's spread never counts as smaller than this (standardised units)


def _stages(model: Any, layers: Sequence[str]) -> list[tuple[str, Any]]:
    """The backbone's stages up to and including the last of ``layers`` (one-line error when the
    model has no such stages)."""
    from deepminer.trunk import feature_stages

    stages = feature_stages(getattr(model, "features", None)) or []
    names = [n for n, _ in stages]
    missing = [name for name in layers if name not in names]
    if missing or not layers:
        raise InputError(f"domain guard: the model's backbone has no stage {', '.join(missing) or '(none)'} "
                         f"(stages: {', '.join(names) or 'none'}); fit the unit-max kind instead")
    return stages[:max(names.index(name) for name in layers) + 1]


def trunk_sha256(model: Any, layers: Sequence[str] = GUARD_LAYERS) -> str:
    """SHA-256 of the weights and buffers of the stages the guard runs (``num_batches_tracked``
    left out: eval mode does not use it): the same for every model that keeps them frozen."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, module in _stages(model, layers):
        for key, t in sorted(module.state_dict().items()):
            if key.endswith("num_batches_tracked"):
                continue
            arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
            h.update(f"{name}.{key}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def guard_side(model: Any, height: int, width: int, *, tissue: np.ndarray | None = None,
               spacing_mm: float | None = None) -> tuple[int, str]:
    """``(long side, how)``: the model's own scale for an image of ``height x width``
    (:func:`deepminer.model_scale.input_side` without an asked ``max_side``: pixel spacing, else
    the breast's extent, else the default for a model that records no scale)."""
    from deepminer.model_scale import input_side

    return input_side(model, height, width, spacing_mm=spacing_mm, tissue=tissue)


def resize_to_side(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` (grey float) with its long side ``side``: shrunk by area, enlarged bilinearly."""
    from PIL import Image

    from deepminer.geometry import fit_image

    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape
    if max(h, w) >= side:
        return np.asarray(fit_image(a, int(side)), dtype=np.float32)
    k = side / max(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return np.asarray(Image.fromarray(a, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def image_statistics(pixels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """[len(:data:`STAT_NAMES`)] statistics of a grey image (float in [0, 1], raw: not masked) and
    its breast ``region`` (bool, the same shape), at the scale they are given."""
    p = np.asarray(pixels, dtype=np.float64)
    r = np.asarray(region, dtype=bool)
    out: dict[str, float] = {"tissue_fraction": float(r.mean()) if r.size else 0.0}
    inside = p[r] if r.any() else p.reshape(-1)
    mu, sd = float(inside.mean()), float(inside.std())
    z = (inside - mu) / max(sd, 1e-6)
    q05, q50, q95 = np.percentile(inside, [5, 50, 95])
    out.update(breast_mean=mu, breast_std=sd, breast_skew=float((z ** 3).mean()),
               breast_kurtosis=float(np.log1p((z ** 4).mean())), breast_q05=float(q05), breast_q50=float(q50),
               breast_q95=float(q95), breast_saturated=float((inside >= 0.98).mean()))
    bg = p[~r]
    out.update(background_mean=float(bg.mean()) if bg.size else 0.0, background_std=float(bg.std()) if bg.size else 0.0,
               background_q99=float(np.percentile(bg, 99)) if bg.size else 0.0)
    # high frequencies inside the breast (away from its edge): the 4-neighbour Laplacian and the gradient
    core = r.copy()
    core[1:, :] &= r[:-1, :]
    core[:-1, :] &= r[1:, :]
    core[:, 1:] &= r[:, :-1]
    core[:, :-1] &= r[:, 1:]
    core[0, :] = core[-1, :] = False
    core[:, 0] = core[:, -1] = False
    if core.sum() < 16:
        core = np.zeros_like(r)
        core[1:-1, 1:-1] = True
    lap = np.zeros_like(p)
    lap[1:-1, 1:-1] = 4 * p[1:-1, 1:-1] - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    gy, gx = np.gradient(p)
    grad = np.hypot(gx, gy)
    out.update(noise_level=float(np.log(np.abs(lap[core]).mean() + 1e-5)),
               gradient_mean=float(np.log(grad[core].mean() + 1e-5)),
               edge_density=float((grad[core] > 0.02).mean()))
    borders = sorted(float(b.mean()) for b in (r[0, :], r[-1, :], r[:, 0], r[:, -1]))
    out.update(border_min=borders[0], border_low=borders[1], border_high=borders[2], border_max=borders[3])
    return np.array([out[name] for name in STAT_NAMES], dtype=np.float64)


def guard_features(model: Any, pixels: np.ndarray, region: np.ndarray | None, side: int, *,
                   layers: Sequence[str] = GUARD_LAYERS) -> np.ndarray:
    """The guard's raw features of one image: ``pixels`` grey float in [0, 1] as decoded (not
    masked), ``region`` its tissue mask (None: computed here), evaluated at long side ``side``:
    per frozen layer the channel means and log-stds over the breast's cells (the model sees the
    tissue-masked image, as the engine does), then :func:`image_statistics`."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own alias

    from deepminer.data.tissue import tissue_mask

    px = np.asarray(pixels, dtype=np.float32)
    reg = tissue_mask(px) if region is None else np.asarray(region, dtype=bool)
    if not reg.any():
        reg = np.ones_like(reg)  # no breast: describe the whole image (the tissue rule rejects it anyway)
    small = resize_to_side(px, side)
    small_reg = resize_to_side(reg.astype(np.float32), side) >= 0.5
    if not small_reg.any():
        small_reg = np.ones_like(small_reg)
    masked = np.where(small_reg, small, 0.0).astype(np.float32)
    stages = _stages(model, layers)
    wanted = set(layers)
    feats: list[np.ndarray] = []
    device = getattr(model, "device", torch.device("cpu"))
    with torch.inference_mode():
        x = model.normalize(torch.from_numpy(masked)[None, None].to(device))
        m = torch.from_numpy(small_reg.astype(np.float32))[None, None].to(device)
        for name, module in stages:
            x = module(x)
            if name in wanted:
                a = x[0].float()
                cells = F.interpolate(m, size=a.shape[-2:], mode="area")[0, 0] >= 0.5
                if int(cells.sum()) < 2:
                    cells = torch.ones_like(cells)
                v = a[:, cells]
                feats += [v.mean(1).cpu().numpy(), torch.log(v.std(1, unbiased=False) + 1e-3).cpu().numpy()]
    feats.append(image_statistics(small, small_reg))
    return np.concatenate([np.asarray(f, dtype=np.float64).reshape(-1) for f in feats])


def feature_names(model: Any, layers: Sequence[str] = GUARD_LAYERS) -> list[str]:
    """Names of :func:`guard_features`' entries (``net.blocks.4.std.17``, ``noise_level``, ...)."""
    names: list[str] = []
    for name, module in _stages(model, layers):
        if name in layers:
            out = _out_channels(module)
            names += [f"{name}.mean.{c}" for c in range(out)] + [f"{name}.std.{c}" for c in range(out)]
    return names + list(STAT_NAMES)


def _out_channels(module: Any) -> int:
    """Output channels of a backbone stage (its last convolution or batch norm)."""
    import torch

    last = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            last = int(m.out_channels)
        elif isinstance(m, torch.nn.BatchNorm2d):
            last = int(m.num_features)
    return last


@dataclass
class DomainGuard:
    """The frozen-trunk guard (module docs above :data:`GUARD_KIND`): standardisation
    (``center``, ``spread``), the Gaussian of the standardised features (``gauss``, a
    :class:`DomainModel` whose own threshold is this guard's) and what it was fitted on."""

    center: np.ndarray
    spread: np.ndarray
    gauss: DomainModel
    threshold: float
    percentile: float = GUARD_PERCENTILE
    layers: tuple[str, ...] = GUARD_LAYERS
    trunk_sha256: str = ""
    weights_sha256: str = ""
    names: tuple[str, ...] = ()
    fit: dict[str, Any] = field(default_factory=dict)
    min_tissue: float = MIN_TISSUE
    method: str = GUARD_METHOD
    kind: str = GUARD_KIND

    def standardised(self, features: Any) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.center) / self.spread

    def score(self, features: Any) -> np.ndarray | float:
        """Mahalanobis distance of raw guard features [F] (a float) or ``(n, F)`` (an array)."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape[-1] != self.center.shape[0]:
            raise InputError(f"domain guard: {x.shape[-1]} features for a guard of {self.center.shape[0]}")
        return self.gauss.score(self.standardised(x))

    def features(self, model: Any, pixels: np.ndarray, region: np.ndarray | None, side: int) -> np.ndarray:
        return guard_features(model, pixels, region, side, layers=self.layers)

    def unusual(self, features: Any, top: int = 2) -> str:
        """The features farthest from the phantoms (standardised), for the reason line."""
        z = self.standardised(np.asarray(features).reshape(-1))
        order = np.argsort(-np.abs(z))[:top]
        names = self.names if len(self.names) == z.shape[0] else tuple(str(i) for i in range(z.shape[0]))
        return ", ".join(f"{names[i]} z={z[i]:+.3g}" for i in order)

    def verdict(self, features: Any, tissue_fraction: float | None = None, *, side: int | None = None) -> dict[str, Any]:
        """``input.domain`` from the raw guard features: the keys of :meth:`DomainModel.verdict`
        and ``side`` (the long side the image was judged at)."""
        f = np.asarray(features, dtype=np.float64).reshape(-1)
        s = float(self.score(f))
        reason = None
        if tissue_fraction is not None and float(tissue_fraction) < self.min_tissue:
            reason = f"no breast tissue found (tissue fraction {float(tissue_fraction):.4f} < {self.min_tissue:g})"
        elif not np.isfinite(s) or s > self.threshold:
            reason = f"score above the threshold ({s:.4g} > {float(self.threshold):.4g}; most unusual: {self.unusual(f)})"
        return {"method": self.method, "score": round(s, 3), "threshold": round(float(self.threshold), 3),
                "percentile": float(self.percentile), "in_domain": reason is None, "reason": reason,
                "side": None if side is None else int(side)}

    def judge(self, *, model: Any, pixels: np.ndarray, region: np.ndarray | None = None,
              tissue_fraction: float | None = None, unit_max: Any = None, spacing_mm: float | None = None,
              side: int | None = None) -> dict[str, Any]:
        """What the server calls: the verdict of the decoded ``pixels`` (grey, not masked) with
        their tissue ``region`` at the model's own scale (``side``; None: :func:`guard_side`).
        ``unit_max`` is not used (the fine-tuned layer forgets what tells real images apart)."""
        from deepminer.data.tissue import tissue_fraction as fraction_of
        from deepminer.data.tissue import tissue_mask

        reg = tissue_mask(np.asarray(pixels, dtype=np.float32)) if region is None else np.asarray(region, dtype=bool)
        frac = fraction_of(reg) if tissue_fraction is None else float(tissue_fraction)
        if side is None:
            side, _how = guard_side(model, reg.shape[0], reg.shape[1], tissue=reg if reg.any() else None,
                                    spacing_mm=spacing_mm)
        return self.verdict(self.features(model, pixels, reg, int(side)), frac, side=int(side))

    def check_model(self, weights_sha256: str = "", *, model: Any = None, source: str = "domain file") -> None:
        """One-line :class:`InputError` when ``model``'s frozen layers are not the ones this guard
        was fitted on (a model that only retrained ``net.blocks.5`` on keeps it)."""
        if model is None or not self.trunk_sha256:
            return
        try:
            mine = trunk_sha256(model, self.layers)
        except InputError as err:
            raise InputError(f"{source}: {err}") from None
        if mine != self.trunk_sha256:
            raise InputError(f"{source}: fitted for frozen layers {self.trunk_sha256[:12]} (up to {self.layers[-1]}), "
                             f"this model's are {mine[:12]}; refit it with 'deepminer domain-fit'")

    def save(self, path: str | os.PathLike) -> Path:
        import torch

        g = self.gauss
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"format": GUARD_FORMAT, "kind": self.kind, "method": self.method, "layers": list(self.layers),
                "names": list(self.names), "center": torch.from_numpy(self.center.astype(np.float64)),
                "spread": torch.from_numpy(self.spread.astype(np.float64)),
                "mean": torch.from_numpy(g.mean.astype(np.float64)),
                "components": torch.from_numpy(np.ascontiguousarray(g.components, dtype=np.float64)),
                "variances": torch.from_numpy(g.variances.astype(np.float64)),
                "residual_variance": float(g.residual_variance), "threshold": float(self.threshold),
                "percentile": float(self.percentile), "min_tissue": float(self.min_tissue),
                "trunk_sha256": self.trunk_sha256, "weights_sha256": self.weights_sha256, "fit": dict(self.fit)}
        with atomic_file(path) as fh:
            torch.save(blob, fh)
        return path

    @classmethod
    def from_blob(cls, blob: Mapping[str, Any]) -> DomainGuard:
        if int(blob.get("format", 0)) != GUARD_FORMAT:
            raise ValueError(f"format {blob.get('format')!r} of kind {GUARD_KIND!r} (this version reads {GUARD_FORMAT})")
        gauss = DomainModel(mean=blob["mean"].double().numpy(), components=blob["components"].double().numpy(),
                            variances=blob["variances"].double().numpy(),
                            residual_variance=float(blob["residual_variance"]), threshold=float(blob["threshold"]))
        return cls(center=blob["center"].double().numpy(), spread=blob["spread"].double().numpy(), gauss=gauss,
                   threshold=float(blob["threshold"]), percentile=float(blob["percentile"]),
                   layers=tuple(blob["layers"]), trunk_sha256=str(blob.get("trunk_sha256", "")),
                   weights_sha256=str(blob.get("weights_sha256", "")), names=tuple(blob.get("names") or ()),
                   fit=dict(blob.get("fit") or {}), min_tissue=float(blob.get("min_tissue", MIN_TISSUE)),
                   method=str(blob.get("method", GUARD_METHOD)))


def load_domain(path: str | os.PathLike, *, model: Any = None,
                weights_sha256: str | None = None) -> DomainModel | DomainGuard:
    """Read any domain file: a guard (``kind`` ``frozen-trunk``, checked against ``model``'s frozen
    layers when given) or the unit-max summary of format 1 (checked against ``weights_sha256``).
    Anything else: a one-line :class:`InputError`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such domain file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one bad input
        raise InputError(f"{path}: not a deepminer domain file ({type(err).__name__}: {err})") from None
    kind = blob.get("kind") if isinstance(blob, Mapping) else None
    if kind is None:
        return DomainModel.load(path, weights_sha256=weights_sha256)
    if kind != GUARD_KIND:
        raise InputError(f"{path}: domain file of unknown kind {kind!r} (known: {GUARD_KIND}, unit-max)")
    try:
        guard = DomainGuard.from_blob(blob)
    except Exception as err:  # noqa: BLE001 - any malformed file is one bad input
        raise InputError(f"{path}: not a readable domain guard ({type(err).__name__}: {err})") from None
    guard.check_model(model=model, source=str(path))
    return guard


def fit_guard(rows: Any, *, percentile: float = GUARD_PERCENTILE, folds: int = GUARD_FOLDS,
              groups: Sequence[Any] | None = None, layers: Sequence[str] = GUARD_LAYERS, trunk_hash: str = "",
              weights_sha256: str = "", names: Sequence[str] = (), fit: Mapping[str, Any] | None = None) -> DomainGuard:
    """Standardise ``rows`` ``(n, F)`` of raw guard features and fit the Ledoit-Wolf Gaussian on all
    of them (all directions kept); the threshold is ``percentile`` of the **out-of-fold** scores: row
    ``i`` in fold ``i % folds`` is scored by the guard fitted on the other folds, so every score
    is that of an image its Gaussian did not see (and, fitted on fewer rows, a little higher than the
    final guard would give: a conservative threshold). ``groups`` (e.g. the generator size of each
    row): the share of each group's out-of-fold scores under the threshold goes to ``fit``."""
    x = np.asarray(rows, dtype=np.float64)
    folds = int(folds)
    if x.ndim != 2 or x.shape[0] < 2 * max(folds, 2):
        raise InputError(f"domain guard fit: need at least {2 * max(folds, 2)} feature rows, got shape {x.shape}")
    if folds < 2:
        raise InputError(f"domain guard fit: folds must be at least 2, got {folds}")
    if not 0 < percentile <= 100:
        raise InputError(f"domain guard fit: the percentile must be in (0, 100], got {percentile}")

    def gaussian(part: np.ndarray) -> tuple[np.ndarray, np.ndarray, DomainModel]:
        center = part.mean(0)
        spread = np.maximum(part.std(0), _STD_FLOOR * np.maximum(1.0, np.abs(center)))
        z = (part - center) / spread
        return center, spread, fit_domain(z, z[:1], percentile=100, components=x.shape[1], transform="none")

    fold = np.arange(x.shape[0]) % folds
    oof = np.zeros(x.shape[0])
    for f in range(folds):
        c, s, g = gaussian(x[fold != f])
        oof[fold == f] = np.asarray(g.score((x[fold == f] - c) / s))
    center, spread, gauss = gaussian(x)
    threshold = float(np.percentile(oof, percentile))
    gauss.threshold = threshold
    record: dict[str, Any] = {"rows": int(x.shape[0]), "folds": folds, "features": int(x.shape[1]),
                              "shrinkage": gauss.fit["shrinkage"],
                              "fit_score_median": gauss.fit["train_score_median"],
                              "heldout_score_median": round(float(np.median(oof)), 3),
                              "heldout_score_max": round(float(oof.max()), 3)}
    if groups is not None:
        labels = [str(g) for g in groups]
        record["heldout_in_domain"] = {lab: f"{int(sum(o <= threshold for o, g in zip(oof, labels) if g == lab))}/"
                                            f"{labels.count(lab)}" for lab in dict.fromkeys(labels)}
    return DomainGuard(center=center, spread=spread, gauss=gauss, threshold=threshold,
                       percentile=float(percentile), layers=tuple(layers), trunk_sha256=trunk_hash,
                       weights_sha256=weights_sha256, names=tuple(names), fit={**dict(fit or {}), **record})
