"""Fine-tuning on DeepMiner patches: the training loop and its run folder. The patch-level
evaluation it runs is :mod:`deepminer.patch_eval`, the card it writes :mod:`deepminer.model_card`.

A run folder ``RUN/`` holds:

* ``last.pt`` — model + optimizer + epoch + history (plain values; ``torch.load(weights_only=True)``),
  rewritten after every epoch; ``--resume`` continues at the next epoch;
* ``best.pt`` — the lowest-validation-loss model in our format (:func:`deepminer.models.save_model`);
* ``metrics.json`` — config, data summary, one entry per epoch (train loss, val loss, per-class
  AUC and pAUC at TPR 0.8), the test metrics of ``best.pt`` and the histogram baseline;
* ``MODEL_CARD.md`` — data, recipe, metrics, intended use (demonstration, not clinical use).

Recipe defaults are DeepMiner's (SGD, lr 1e-4, momentum 0.9, weight decay 1e-4, batch 32); random
horizontal/vertical flips are the only augmentation; a class-balanced sampler (weights 1/count of
the patch's class, drawn with replacement) is on by default because normal patches outnumber
lesion patches about 20:1 (``balance=False`` gives plain shuffling).
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from deepminer import CLASSES
from deepminer.atomic import atomic_file
from deepminer.errors import InputError
from deepminer.metrics import classification_report, nan_to_none
from deepminer.model_card import fmt_number, model_card
from deepminer.model_folder import CARD, METRICS
from deepminer.patch_eval import baseline_report, evaluate_table, loader, predict
from deepminer.runtime import resolve_device
from deepminer.trunk import (CachedFeatures, TopOfTrunk, atomic_torch_save, freeze_before, set_train_mode,
                             split_features)

LAST, BEST = "last.pt", "best.pt"  #: and METRICS, CARD (deepminer.model_folder): the run folder


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in ``last.pt`` and ``metrics.json``)."""

    data: str
    arch: str
    out: str
    head: str = "gap"
    wildcat_maps: int = 4
    wildcat_k: float = 0.1
    wildcat_alpha: float = 0.7
    epochs: int = 10
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    patch_size: int = 224
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    max_patches_per_epoch: int | None = None
    max_val_patches_per_class: int | None = None
    max_test_patches: int | None = None
    patience: int | None = None
    balance: bool = True
    pretrained: bool = True
    train_from: str | None = None
    cache_features: bool = False
    max_train_patches_per_class: int | None = None
    patches: str | None = None
    test_data: str | None = None
    baseline: bool = True
    half: bool = False
    command: str = ""

    def check(self) -> None:
        """One-line :class:`InputError` for values that cannot work."""
        positive = ("epochs", "batch_size", "patch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.lr <= 0:
            raise InputError("--lr: must be positive")
        if self.workers < 0:
            raise InputError("--workers: must be 0 or more")
        for name in ("max_patches_per_epoch", "max_val_patches_per_class", "max_train_patches_per_class",
                     "max_test_patches", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.cache_features and not self.train_from:
            raise InputError("--cache-features: needs --train-from LAYER (only a frozen trunk can be cached)")
        if self.head not in ("gap", "wildcat"):
            raise InputError(f"--head: unknown head {self.head!r}; known: gap, wildcat")
        if self.wildcat_maps < 1:
            raise InputError("--wildcat-maps: must be at least 1")
        if self.wildcat_k <= 0:
            raise InputError("--wildcat-k: must be positive (a fraction in (0, 1) or a count >= 1)")
        if self.wildcat_alpha < 0:
            raise InputError("--wildcat-alpha: must be 0 or more")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device: {self.device!r} is not auto, cpu or cuda")
        from deepminer.models import arch_spec

        arch_spec(self.arch)  # unknown arch -> one-line error before any work
        if not Path(self.data).is_dir():
            raise InputError(f"{self.data}: no such dataset folder")
        if self.test_data is not None and not Path(self.test_data).is_dir():
            raise InputError(f"{self.test_data}: no such dataset folder (--test-data)")


# -- small pieces -------------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def epoch_sampler(labels: np.ndarray, num_samples: int, *, balance: bool, seed: int):
    """Indices drawn for one epoch: class-balanced with replacement (``balance``), else a random
    subset/permutation without replacement. Seeded so a resumed run draws what it would have."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    if balance:
        counts = np.bincount(labels, minlength=int(labels.max()) + 1).astype(np.float64)
        weights = (1.0 / counts[labels]).tolist()  # float64 -> float: the sampler's double weights unchanged
        return torch.utils.data.WeightedRandomSampler(weights, num_samples, replacement=True, generator=g)
    return torch.randperm(len(labels), generator=g)[:num_samples].tolist()


# -- training -----------------------------------------------------------------------------------

def _summary(table) -> dict:
    out = {}
    for split, part in table.groupby("split"):
        out[str(split)] = {"images": int(part["image_id"].nunique()), "patches": int(len(part)),
                           **{c: int((part["label"] == c).sum()) for c in CLASSES}}
    return out


@dataclass
class _Run:
    """One training session: the model and its data (:func:`_setup`) and the run's progress so far
    (restored from ``last.pt`` on ``--resume``)."""

    cfg: TrainConfig
    out: Path
    device: Any
    model: Any
    opt: Any
    frozen: list[str]
    table: Any
    source: str
    train_tab: Any
    train_ds: Any
    forward: Any
    train_data: Any
    val_data: Any
    prep_seconds: float
    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    start: int = 1
    initial: dict | None = None
    train_seconds: float = 0.0

    @property
    def eval_batch(self) -> int:
        return max(self.cfg.batch_size, 64)

    @property
    def workers(self) -> int:
        """DataLoader workers: none over cached features (they are in memory)."""
        return 0 if self.cfg.cache_features else self.cfg.workers


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune ``cfg.arch`` on the patches of ``cfg.data``; write the run folder; return metrics."""
    cfg.check()
    out = Path(cfg.out)
    state = _saved_state(cfg, out, resume)
    run = _setup(cfg, out, state, progress)
    if state is not None:
        _restore(run, state)
    out.mkdir(parents=True, exist_ok=True)
    if run.initial is None:
        probs, labels, loss = predict(run.model, run.val_data, batch_size=run.eval_batch, device=run.device,
                                      forward=run.forward, workers=cfg.workers, progress=progress,
                                      desc="val (before training)")
        run.initial = {"val_loss": loss, "val": nan_to_none(classification_report(labels, probs, run.model.classes))}
    t_start = time.time()
    for epoch in range(run.start, cfg.epochs + 1):
        if _stalled(run.history, cfg.patience, epoch - 1):
            print(f"stopping before epoch {epoch}: validation loss has not improved for {cfg.patience} epochs",
                  file=sys.stderr)
            break
        _epoch(run, epoch, progress)
    metrics = _run_metrics(run)
    metrics.update(_test_reports(run, progress))
    metrics["wall_seconds_this_session"] = round(time.time() - t_start, 1)
    _atomic_write_text(out / METRICS, json.dumps(nan_to_none(metrics), indent=2) + "\n")
    _atomic_write_text(out / CARD, model_card(metrics))
    return metrics


def _saved_state(cfg: TrainConfig, out: Path, resume: bool) -> dict | None:
    """``last.pt`` of the run in ``out`` when resuming (checked against ``cfg``), else None; a
    one-line error for a run folder that does not fit the request."""
    from deepminer.models.checkpoints import torch_load

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a run folder")
    last_path = out / LAST
    if not resume:
        if last_path.exists():
            raise InputError(f"{out}: already holds a run (last.pt); pass --resume to continue it or choose "
                             "another --out")
        return None
    if not last_path.is_file():
        raise InputError(f"{last_path}: nothing to resume (no last.pt in the run folder)")
    state = torch_load(last_path)
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    for key in ("arch", "head", "patch_size"):
        if saved.get(key) != getattr(cfg, key):
            raise InputError(f"{last_path}: the run used --{key.replace('_', '-')} {saved.get(key)}, "
                             f"not {getattr(cfg, key)}")
    return state


def _split_tables(cfg: TrainConfig, progress: bool):
    """``(patch table, its source, train table, val table)``, capped per class as configured."""
    from deepminer.data.patches import cap_per_class, load_or_extract, split_table

    table = load_or_extract(cfg.data, cfg.patches, progress=progress)
    source = cfg.patches or f"{cfg.data} patches"
    train_tab = cap_per_class(split_table(table, "train", source), cfg.max_train_patches_per_class, cfg.seed)
    val_tab = cap_per_class(split_table(table, "val", source), cfg.max_val_patches_per_class, cfg.seed)
    if train_tab["label"].nunique() < 2:
        raise InputError(f"{source}: the train split has only {train_tab['label'].iloc[0]} patches")
    return table, source, train_tab, val_tab


def _head_kwargs(cfg: TrainConfig) -> dict:
    """``build_model`` keywords of the head (the WILDCAT settings; none for GAP)."""
    if cfg.head != "wildcat":
        return {}
    return {"wildcat_maps": cfg.wildcat_maps, "wildcat_k": cfg.wildcat_k, "wildcat_alpha": cfg.wildcat_alpha}


def _setup(cfg: TrainConfig, out: Path, state: dict | None, progress: bool) -> _Run:
    """Seed, tables, model (frozen up to ``--train-from``), SGD, the preloaded patch sets and, with
    ``--cache-features``, the frozen trunk's cached outputs."""
    import torch

    from deepminer.data.patches import PatchDataset
    from deepminer.models import build_model

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    table, source, train_tab, val_tab = _split_tables(cfg, progress)
    model = build_model(cfg.arch, head=cfg.head, num_classes=len(CLASSES), pretrained=cfg.pretrained,
                        **_head_kwargs(cfg))
    frozen = freeze_before(model, cfg.train_from)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    train_ds = PatchDataset(cfg.data, train_tab, size=cfg.patch_size, augment=True).preload(progress)
    val_ds = PatchDataset(cfg.data, val_tab, size=cfg.patch_size).preload(progress)
    t_prep = time.time()
    forward, train_data, val_data = _inputs(cfg, out, model, (train_tab, train_ds), (val_tab, val_ds), device,
                                            progress)
    prep_seconds = time.time() - t_prep + (float(state.get("prep_seconds", 0.0)) if state else 0.0)
    return _Run(cfg=cfg, out=out, device=device, model=model, opt=opt, frozen=frozen, table=table, source=source,
                train_tab=train_tab, train_ds=train_ds, forward=forward, train_data=train_data, val_data=val_data,
                prep_seconds=prep_seconds)


def _inputs(cfg: TrainConfig, out: Path, model, train: tuple[Any, Any], val: tuple[Any, Any], device,
            progress: bool) -> tuple[Any, Any, Any]:
    """``(forward, train data, val data)``: the model on the patch sets (``(table, dataset)`` each),
    or with ``--cache-features`` the model's top on the frozen trunk's outputs, computed once per
    run folder (:meth:`CachedFeatures.cached`)."""
    (train_tab, train_ds), (val_tab, val_ds) = train, val
    if not cfg.cache_features:
        return model, train_ds, val_ds
    trunk, rest = split_features(model, str(cfg.train_from))  # check(): --cache-features has --train-from
    out.mkdir(parents=True, exist_ok=True)
    key = {"arch": cfg.arch, "train_from": cfg.train_from, "patch_size": cfg.patch_size,
           "pretrained": cfg.pretrained, "data": str(Path(cfg.data).resolve())}
    eval_bs = max(cfg.batch_size, 64)
    train_data = CachedFeatures.cached(out / "features_train.pt", key, train_tab, trunk, model, train_ds,
                                       flips=True, batch_size=eval_bs, device=device, progress=progress,
                                       desc="caching train features (4 flips)")
    val_data = CachedFeatures.cached(out / "features_val.pt", key, val_tab, trunk, model, val_ds,
                                     flips=False, batch_size=eval_bs, device=device, progress=progress,
                                     desc="caching val features")
    return TopOfTrunk(model, rest), train_data, val_data


def _restore(run: _Run, state: dict) -> None:
    """Model, optimizer and the run's progress from ``last.pt``."""
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.history = list(state.get("history", []))
    run.best_val = float(state.get("best_val_loss", math.inf))
    run.start = int(state["epoch"]) + 1
    run.initial = state.get("initial")
    run.train_seconds = float(state.get("train_seconds", 0.0))


def _stalled(history: list[dict], patience: int | None, last_epoch: int) -> bool:
    """Whether ``patience`` epochs have passed since the last best one (up to ``last_epoch``)."""
    best_epochs = [e["epoch"] for e in history if e.get("best")]
    return bool(patience and best_epochs and last_epoch - best_epochs[-1] >= patience)


def _fit_epoch(run: _Run, epoch: int, t0: float, progress: bool) -> tuple[list[float], int]:
    """One epoch of SGD on a seeded draw of training patches: ``(batch losses, patches seen)``."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = run.cfg
    n_per_epoch = min(len(run.train_ds), cfg.max_patches_per_epoch or len(run.train_ds))
    sampler = epoch_sampler(run.train_ds.labels, n_per_epoch, balance=cfg.balance, seed=cfg.seed * 1000 + epoch)
    torch.manual_seed(cfg.seed * 1000 + epoch)  # flips
    batches = loader(run.train_data, cfg.batch_size, run.workers, sampler, run.device)
    set_train_mode(run.model)
    losses: list[float] = []
    seen = 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress,
               file=sys.stderr, leave=False)
    for x, y in bar:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        loss = F.cross_entropy(run.forward(x), y)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        losses.append(loss.item())
        seen += len(y)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", rate=f"{seen / max(1e-9, time.time() - t0):.1f} patch/s")
    bar.close()
    return losses, seen


def _epoch(run: _Run, epoch: int, progress: bool) -> None:
    """Train one epoch, validate, keep ``best.pt`` when the validation loss is the lowest so far,
    rewrite ``last.pt`` and print one line."""
    from deepminer.models import save_model

    cfg = run.cfg
    t0 = time.time()
    losses, seen = _fit_epoch(run, epoch, t0, progress)
    probs, labels, val_loss = predict(run.model, run.val_data, batch_size=run.eval_batch, device=run.device,
                                      forward=run.forward, workers=run.workers, progress=progress,
                                      desc=f"val {epoch}")
    rep = classification_report(labels, probs, run.model.classes)
    seconds = time.time() - t0
    run.train_seconds += seconds
    entry = _epoch_entry(epoch, losses, seen, val_loss, rep, seconds)
    is_best = val_loss < run.best_val
    if is_best:
        run.best_val = val_loss
        save_model(run.model, run.out / BEST, half=cfg.half, epoch=epoch, val_loss=val_loss, **_best_meta(cfg))
    entry["best"] = is_best
    run.history.append(entry)
    _save_last(run, epoch)
    print(f"epoch {epoch}/{cfg.epochs}: train loss {entry['train_loss']:.4f}, val loss {val_loss:.4f}, "
          f"val AUC " + ", ".join(f"{c} {fmt_number(v)}" for c, v in rep["auc"].items())
          + (" (best)" if is_best else "") + f", {seconds:.0f} s", file=sys.stderr)


def _epoch_entry(epoch: int, losses: list[float], seen: int, val_loss: float, rep: dict, seconds: float) -> dict:
    """One epoch of ``metrics.json``: training losses (all, first and last fifth), validation."""
    k = max(1, len(losses) // 5)
    return {"epoch": epoch, "train_loss": float(np.mean(losses)),
            "train_loss_first": float(np.mean(losses[:k])), "train_loss_last": float(np.mean(losses[-k:])),
            "patches": seen, "val_loss": val_loss, "val": nan_to_none(rep), "seconds": round(seconds, 1)}


def _best_meta(cfg: TrainConfig) -> dict:
    """What ``best.pt`` records of the run; ``image_width``: the width at which the model saw images
    (a patch = 25% of it), for whole-image use."""
    from deepminer.data.dataset import describe_dataset

    return {"patch_size": cfg.patch_size, "image_width": int(round(cfg.patch_size / 0.25)),
            "data": str(cfg.data), "trained_on": describe_dataset(cfg.data), "recipe": _recipe(cfg),
            "seed": cfg.seed}


def _save_last(run: _Run, epoch: int) -> None:
    """``last.pt``: everything ``--resume`` needs to continue after ``epoch``."""
    atomic_torch_save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch,
                        "config": asdict(run.cfg), "history": nan_to_none(run.history),
                        "best_val_loss": run.best_val, "initial": run.initial, "train_seconds": run.train_seconds,
                        "prep_seconds": run.prep_seconds}, run.out / LAST)


def _run_metrics(run: _Run) -> dict:
    """``metrics.json`` before the test sets: config, data, curve, best epoch, times."""
    metrics = {"config": asdict(run.cfg), "frozen_parameters": len(run.frozen), "data": _summary(run.table),
               "initial": run.initial, "epochs": nan_to_none(run.history), "best_epoch": None,
               "train_seconds": round(run.train_seconds, 1), "cache_seconds": round(run.prep_seconds, 1),
               "device": str(run.device)}
    best = [e for e in run.history if e.get("best")]
    if best:
        metrics["best_epoch"] = best[-1]["epoch"]
    return metrics


def _test_sets(run: _Run, progress: bool) -> list[tuple[str, str, Any]]:
    """``(key, folder, table)`` of the test split (when the table has one) and of ``--test-data``."""
    from deepminer.data.patches import load_or_extract, split_table

    cfg = run.cfg
    sets = []
    if (run.table["split"] == "test").any():
        sets.append(("test", cfg.data, split_table(run.table, "test", run.source)))
    if cfg.test_data:
        fresh = load_or_extract(cfg.test_data, progress=progress)
        if fresh.empty:
            raise InputError(f"{cfg.test_data}: no patches")
        sets.append(("fresh_test", cfg.test_data, fresh))
    return sets


def _test_reports(run: _Run, progress: bool) -> dict:
    """``best.pt`` on every test set (a seeded sample with ``--max-test-patches``), with the
    histogram baseline unless ``--no-baseline``."""
    from deepminer.data.patches import subsample
    from deepminer.models import load_model

    cfg = run.cfg
    if not (run.out / BEST).is_file():
        return {}
    best_model = load_model(run.out / BEST, map_location=run.device)
    reports = {}
    for key, folder, tab in _test_sets(run, progress):
        tab = subsample(tab, cfg.max_test_patches, cfg.seed)
        rep = evaluate_table(best_model, folder, tab, patch_size=cfg.patch_size, batch_size=run.eval_batch,
                             device=run.device, workers=cfg.workers, progress=progress, desc=key)
        if cfg.baseline:
            rep["baseline"] = baseline_report(cfg.data, run.train_tab, folder, tab, seed=cfg.seed)
        rep["data"] = str(folder)
        reports[key] = nan_to_none(rep)
    return reports


def _recipe(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("arch", "head", "pretrained", "lr", "momentum", "weight_decay",
                                         "batch_size", "patch_size", "epochs", "balance", "train_from",
                                         "cache_features", "max_patches_per_epoch", "max_train_patches_per_class",
                                         "max_val_patches_per_class", "patience", "seed")}


def command_line(cfg: TrainConfig) -> str:
    """The ``deepminer train`` command that reproduces ``cfg`` (options that differ from defaults)."""
    parts = ["deepminer", "train", "--data", cfg.data, "--arch", cfg.arch, "--out", cfg.out]
    for f in fields(TrainConfig):
        if f.name in ("data", "arch", "out", "command"):
            continue
        v = getattr(cfg, f.name)
        if v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def config_from_args(args) -> TrainConfig:
    """A :class:`TrainConfig` from parsed CLI arguments (same names)."""
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k != "command"})
    cfg.command = command_line(cfg)
    return cfg
