"""Patch-level evaluation of a classifier: its predictions over a patch table, the per-class
report (AUC, pAUC at TPR 0.8, accuracy; :func:`deepminer.metrics.classification_report`), the
image-level malignant detection, and the histogram baseline. Used by ``deepminer train`` (validation
and the test sets) and ``deepminer evaluate``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from deepminer import CLASSES
from deepminer.metrics import classification_report, histogram_baseline, pauc_at_tpr


def loader(dataset, batch_size: int, workers: int, sampler=None, device=None):
    """The DataLoader every patch pass uses (training, prediction, feature caching): in order
    unless a ``sampler`` says otherwise, pinned memory for a CUDA ``device``."""
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       num_workers=workers, pin_memory=bool(device and device.type == "cuda"),
                                       persistent_workers=False, drop_last=False)


def predict(model, dataset, *, batch_size: int = 64, device=None, workers: int = 0,
            progress: bool = True, desc: str = "predict", forward=None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(probs (N, C), labels (N,), mean cross-entropy)`` of ``model`` over a patch dataset
    (``forward``: what to call on each batch instead of ``model``, e.g. on cached features)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    device = device or model.device
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for x, y in tqdm(loader(dataset, batch_size, workers, device=device), desc=desc, unit="batch",
                         disable=not progress, leave=False, file=sys.stderr):
            x, y = x.to(device), y.to(device)
            logits = (forward or model)(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            probs.append(torch.softmax(logits, 1).cpu().numpy())
            labels.append(y.cpu().numpy())
    n = sum(len(a) for a in labels)
    if not n:
        return np.zeros((0, len(model.classes))), np.zeros(0, dtype=np.int64), float("nan")
    return np.concatenate(probs), np.concatenate(labels), loss_sum / n


def image_level(table, probs: np.ndarray, image_labels: dict[str, str], classes: Sequence[str] = CLASSES,
                positive: str = "malignant") -> dict:
    """Image-level detection: an image's score is the max over its patches of P(``positive``); the
    truth is the manifest label == ``positive``. ``{"n_images", "n_positive", "auc", "pauc"}``."""
    from sklearn.metrics import roc_auc_score

    c = list(classes).index(positive)
    scores = (table.assign(_s=probs[:, c]).groupby("image_id")["_s"].max())
    y = np.array([image_labels[i] == positive for i in scores.index], dtype=int)
    ok = 0 < y.sum() < len(y)
    return {"n_images": int(len(y)), "n_positive": int(y.sum()),
            "auc": float(roc_auc_score(y, scores.to_numpy())) if ok else float("nan"),
            "pauc": pauc_at_tpr(y, scores.to_numpy()) if ok else float("nan")}


def evaluate_table(model, folder: str | os.PathLike, table, *, patch_size: int | None = None,
                   batch_size: int = 64, device=None, workers: int = 0, progress: bool = True,
                   desc: str = "evaluate") -> dict:
    """Patch-level report (:func:`deepminer.metrics.classification_report` + ``loss``) and the
    image-level malignant detection (``image_level``) of ``model`` on the patches in ``table``."""
    from deepminer.data.dataset import read_manifest
    from deepminer.data.patches import PatchDataset

    size = int(patch_size or (model.meta.get("patch_size") if hasattr(model, "meta") else 0) or 224)
    ds = PatchDataset(folder, table, size=size, classes=model.classes)
    probs, labels, loss = predict(model, ds, batch_size=batch_size, device=device, workers=workers,
                                  progress=progress, desc=desc)
    report = classification_report(labels, probs, model.classes)
    report["loss"] = loss
    report["patch_size"] = size
    if "malignant" in model.classes:
        labels_of = {r["image_id"]: r["label"] for r in read_manifest(folder)}
        report["image_level"] = image_level(ds.table, probs, labels_of, model.classes)
    return report


def baseline_report(train_folder, train_table, test_folder, test_table, *, max_train: int = 4000,
                    seed: int = 0, classes: Sequence[str] = CLASSES) -> dict:
    """The histogram + logistic-regression baseline (:func:`deepminer.metrics.histogram_baseline`)
    fitted on (a stratified sample of at most ``max_train``) training patches at full resolution."""
    from deepminer.data.patches import PatchDataset, subsample

    tr = PatchDataset(train_folder, subsample(train_table, max_train, seed), classes=classes)
    te = PatchDataset(test_folder, test_table, classes=classes)
    rep = histogram_baseline([tr.crop(i) for i in range(len(tr))], tr.labels.tolist(),
                             [te.crop(i) for i in range(len(te))], te.labels.tolist(), classes)
    rep["train_patches"] = len(tr)
    return rep
