"""How far an image lies from the images a model was trained on: the out-of-domain score.

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

    def check_model(self, weights_sha256: str, *, source: str = "domain file") -> None:
        """One-line :class:`InputError` when this summary was fitted for other weights."""
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
