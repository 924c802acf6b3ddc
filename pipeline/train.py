"""Train one backbone on one fold: gradual-unfreezing phases, AdamW + per-phase cosine, best
checkpoint by the fold's validation metric, per-epoch metrics CSV, resumable from the last epoch."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from .config import Phase, TrainConfig
from .files import save_torch, write_csv, write_text
from .job import FoldJob
from .loader import FaceDataset, auto_workers, make_loader, to_model_input, train_transform, training_batches
from .metrics import evaluate, is_better
from .models import AgeGenderNet, above_thresholds, create_model, frozen_prefix_length, set_trainable
from .predict import Inference, predict_arrays
from .pseudo import stage_pseudo_labels, with_pseudo_labels
from .trunk import CachedTrunk, TrunkCache

SMOOTH_L1_BETA = 0.25  # in standard deviations of the training ages (about 5 years on UTKFace)
DLDL_SIGMA = 2.0  # years: the spread of the label distribution around the true age (DLDL-v2)
MV_MEAN_WEIGHT, MV_VARIANCE_WEIGHT = 0.2, 0.05  # the mean-variance loss's lambda_1, lambda_2 (the paper's)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class AgeScale:
    """Ages are learnt as (age - mean) / std (train.normalize_age), else in years (mean 0, std 1)."""

    mean: float
    std: float
    smooth_l1_beta: float  # on the learnt scale: SMOOTH_L1_BETA standard deviations of the training ages

    @classmethod
    def fit(cls, ages: np.ndarray, normalize: bool) -> AgeScale:
        spread = float(ages.std() + 1e-6)
        if normalize:
            return cls(float(ages.mean()), spread, SMOOTH_L1_BETA)
        return cls(0.0, 1.0, SMOOTH_L1_BETA * spread)

    def to_target(self, years: np.ndarray) -> np.ndarray:
        return ((years - self.mean) / self.std).astype(np.float32)


def age_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=beta)


def dldl_loss(logits: torch.Tensor, years: torch.Tensor, spread: float) -> torch.Tensor:
    """DLDL-v2: KL from a Gaussian around the true age (whole years 0..K-1) to the predicted distribution,
    plus the L1 error of its expectation in units of the training ages' spread."""
    ages = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    target = torch.exp(-0.5 * ((ages[None] - years[:, None]) / DLDL_SIGMA) ** 2)
    target = target / target.sum(1, keepdim=True)
    log_p = F.log_softmax(logits.float(), dim=1)
    expectation = log_p.exp() @ ages
    return F.kl_div(log_p, target, reduction="batchmean") + F.l1_loss(expectation, years) / spread


def mean_variance_loss(logits: torch.Tensor, years: torch.Tensor) -> torch.Tensor:
    """Mean-variance loss (Pan et al., CVPR 2018): cross-entropy on the whole year, plus the squared error of the
    distribution's mean and its variance (both in years), weighted as in the paper."""
    ages = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    mean = p @ ages
    variance = (p * (ages[None] - mean[:, None]) ** 2).sum(1)
    ce = F.nll_loss(log_p, years.round().long().clamp(0, logits.shape[1] - 1))
    return ce + MV_MEAN_WEIGHT * 0.5 * ((mean - years) ** 2).mean() + MV_VARIANCE_WEIGHT * variance.mean()


def coral_loss(logits: torch.Tensor, years: torch.Tensor) -> torch.Tensor:
    """CORAL: binary cross-entropy of each threshold "age >= k" (k = 1..K), summed over thresholds as in the paper."""
    above = above_thresholds(years, logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits.float(), above, reduction="none").sum(1).mean()


def warmup_cosine(steps: int, warmup_frac: float):
    """lr factor per step: linear warm-up over warmup_frac of the steps, then cosine to 0."""
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor


@dataclass(frozen=True)
class Objective:
    """The training loss: age loss + gender_weight x gender BCE. The age loss is train.age_loss on the learnt
    scale for a regression head; for the other heads their own loss (dldl_loss, mean_variance_loss, coral_loss), in
    years."""

    age_loss: str
    beta: float  # SmoothL1 beta on the learnt scale
    gender_weight: float
    spread: float = 1.0  # std of the training ages, in years (scales dldl's L1 term)
    age_head: str = "regression"
    gender_smoothing: float = 0.0

    @classmethod
    def of(cls, t: TrainConfig, scale: AgeScale, spread: float = 1.0, age_head: str = "regression") -> Objective:
        return cls(t.age_loss, scale.smooth_l1_beta, t.gender_weight, spread, age_head, t.gender_smoothing)

    def __call__(self, pred_age, gender_logit, y_age, y_gender) -> torch.Tensor:
        target = y_gender * (1 - self.gender_smoothing) + self.gender_smoothing / 2
        gender = F.binary_cross_entropy_with_logits(gender_logit.float(), target)
        if pred_age.ndim == 1:
            age = age_loss(self.age_loss, pred_age.float(), y_age, self.beta)
        elif self.age_head == "meanvar":  # a distribution or ordinal head's logits; y_age in years
            age = mean_variance_loss(pred_age, y_age)
        elif self.age_head == "coral":
            age = coral_loss(pred_age, y_age)
        else:
            age = dldl_loss(pred_age, y_age, self.spread)
        return age + self.gender_weight * gender

    def on_predictions(self, scale: AgeScale, age_pred, prob, age_true, gender_true) -> float:
        """The same loss from raw-scale predictions (validation rows), against the true labels (no smoothing)."""
        a = torch.from_numpy(scale.to_target(np.asarray(age_pred)))
        y = torch.from_numpy(scale.to_target(np.asarray(age_true)))
        p = np.clip(np.asarray(prob, np.float64), 1e-7, 1 - 1e-7)
        logit = torch.from_numpy(np.log(p / (1 - p))).float()
        unsmoothed = replace(self, gender_smoothing=0.0)
        return float(unsmoothed(a, logit, y, torch.from_numpy(np.asarray(gender_true, np.float32))))


@dataclass
class Optimiser:
    """A phase's optimiser and lr schedule, with the fold-wide EMA, stepped together on the model."""

    model: AgeGenderNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEmaV3 | None
    step: int  # global step of the fold (drives the EMA warm-up)
    grad_clip: float

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)  # warm-up: early EMA follows the model closely
        self.step += 1


def train_one_epoch(
    forward, batches, optim: Optimiser, objective: Objective, amp: bool, desc: str, mixup: float = 0.0, seed: int = 0
):
    """One pass over `batches` (images or cached trunk outputs). Returns (images seen, summed loss). With mixup > 0
    each batch is mixed with a shuffled copy of itself, weight lam ~ Beta(mixup, mixup), and the loss is the same
    mix of the losses against both label sets (for cached phases the trunk outputs are mixed: manifold mixup)."""
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None)
    device = next(optim.model.parameters()).device
    rng = np.random.default_rng(seed)
    for x, y_age, y_gender in bar:
        y_age, y_gender = y_age.to(device), y_gender.to(device)
        if mixup > 0:
            lam, perm = float(rng.beta(mixup, mixup)), torch.from_numpy(rng.permutation(len(x)))
            x = x.float() * lam + x.float()[perm] * (1 - lam)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred_age, logit = forward(x)
        loss = objective(pred_age, logit, y_age, y_gender)
        if mixup > 0:
            perm = perm.to(device)
            loss = lam * loss + (1 - lam) * objective(pred_age, logit, y_age[perm], y_gender[perm])
        optim.update(loss)
        seen += len(x)
        loss_sum += loss.item() * len(x)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    return seen, loss_sum


@torch.no_grad()
def sync_frozen_ema(ema: ModelEmaV3, model: AgeGenderNet) -> None:
    """Set the EMA copy of every frozen module to the live weights. They no longer change, so their average
    would converge there anyway; now the EMA model and a frozen trunk cached from the live model agree."""
    ema_modules = dict(ema.module.named_modules())
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            target = ema_modules[name]
            for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                getattr(target, key).copy_(value)


@dataclass
class Progress:
    """What has been done in a fold: restored from last.pt after a kill."""

    epoch: int = 0  # epochs finished
    best: float | None = None  # best validation metric so far (of the model saved as best.pt)
    history: list[dict] = field(default_factory=list)
    phase: int = -1  # phase index of the last finished epoch
    optimizer: dict | None = None
    scheduler: dict | None = None


def load_resume(out: Path, model: AgeGenderNet, ema: ModelEmaV3 | None) -> Progress:
    """Model and EMA weights from out/last.pt into `model` / `ema`, and where the fold stopped."""
    if not (out / "last.pt").is_file():
        return Progress()
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    done = Progress(
        state["epoch"], state["best"], state["history"], state["phase"], state["optimizer"], state["scheduler"]
    )
    if (out / "best.pt").is_file() and checkpoint_epoch(out / "best.pt") > done.epoch:
        done.best = None  # killed between saving best.pt and last.pt: that epoch runs again and is saved again
    return done


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def save_epoch(out: Path, model, optim: Optimiser, phase: int, done: Progress, best_state: dict | None) -> None:
    """best.pt first (when the epoch improved), then last.pt, then metrics.csv: a kill between them is safe."""
    if best_state is not None:
        save_torch(best_state, out / "best.pt")
    last = {
        "model": model.state_dict(),
        "ema": optim.ema.state_dict() if optim.ema is not None else None,
        "optimizer": optim.opt.state_dict(),
        "scheduler": optim.sched.state_dict(),
        "phase": phase,
        "epoch": done.epoch,
        "best": done.best,
        "history": done.history,
    }
    save_torch(last, out / "last.pt")
    write_csv(pd.DataFrame(done.history), out / "metrics.csv")


def start_phase(job: FoldJob, model, pi: int, phase: Phase, n_train: int, done: Progress, ema) -> Optimiser:
    """Freeze what the phase keeps frozen, a fresh optimiser and schedule (or the saved ones mid-phase)."""
    t = job.cfg.train
    n_trainable = set_trainable(model, phase.unfreeze)
    if ema is not None:
        sync_frozen_ema(ema, model)
    opt = create_optimizer_v2(model, "adamw", lr=phase.lr, weight_decay=t.weight_decay)
    steps_per_epoch = training_batches(n_train, job.cfg.batch_size(job.model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(phase.epochs * steps_per_epoch, t.warmup_frac))
    if done.phase == pi and done.optimizer is not None:
        opt.load_state_dict(done.optimizer)
        sched.load_state_dict(done.scheduler)
    phases = [p for p in job.cfg.phases(job.model) if p.epochs > 0]
    print(
        f"{job.name}: phase {pi + 1}/{len(phases)} train={phase.train} lr={phase.lr:g} "
        f"epochs={phase.epochs} trainable params={n_trainable:,}"
    )
    first_step = sum(training_batches(n_train, job.cfg.batch_size(job.model)) * p.epochs for p in phases[:pi])
    return Optimiser(model, opt, sched, ema, first_step + sched.last_epoch, t.grad_clip)


def phase_trunk(cache: TrunkCache, model, phases: list[Phase], pi: int) -> CachedTrunk | None:
    """The phase's cached frozen trunk; computed at the deepest cut the following cached phases need."""
    ahead = [frozen_prefix_length(model, q.unfreeze) for q in phases[pi:]]
    ahead = ahead[: ahead.index(0)] if 0 in ahead else ahead
    return cache.for_phase(frozen_prefix_length(model, phases[pi].unfreeze), min(ahead or [0]))


def validate(job: FoldJob, eval_model, trunk: CachedTrunk | None, va_rows, scale: AgeScale) -> tuple:
    """Validation predictions (no TTA) of the fold's validation rows, from the cache when the phase has one."""
    how = Inference.for_job(job)
    if trunk is not None:
        return trunk.predict_val(eval_model, how, scale.mean, scale.std)
    return predict_arrays(eval_model, job.images.train, va_rows, how, scale.mean, scale.std)


def train_fold(job: FoldJob) -> None:
    out, cfg, t = job.out, job.cfg, job.cfg.train
    if (out / "train_done.json").is_file():
        print(f"{job.name}: already trained, skipping")
        return
    out.mkdir(parents=True, exist_ok=True)
    seed = t.seed * 1000 + job.fold
    seed_everything(seed)
    tr_rows, va_rows = job.rows()
    age = job.comp.train.age.to_numpy(np.float32)
    gender = job.comp.train.gender.to_numpy(np.float32)
    scale = AgeScale.fit(age[tr_rows], t.normalize_age and job.model.age_head == "regression")
    objective = Objective.of(t, scale, float(age[tr_rows].std() + 1e-6), job.model.age_head)

    model = create_model(job.model)
    if job.model.age_head == "coral":
        model.age_head.start_at(age[tr_rows])
    images = job.images.train
    if job.model.pseudo_labels:  # the scale and the head's start above come from the real labels only
        stage_pseudo_labels(out.parents[1], job.model, job.fold)
        test_ids = job.comp.test.id.to_numpy()
        images, tr_rows, age, gender = with_pseudo_labels(out, test_ids, images, job.images.test, tr_rows, age, gender)
        print(f"{job.name}: + {len(test_ids)} test images pseudo-labelled by {job.model.pseudo_labels} fold {job.fold}")
    model = model.to(job.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema, use_warmup=True) if t.ema > 0 else None
    phases = [p for p in cfg.phases(job.model) if p.epochs > 0]
    batch_size = cfg.batch_size(job.model)
    workers = auto_workers(t.num_workers)
    train_ds = FaceDataset(images, tr_rows, scale.to_target(age[tr_rows]), gender[tr_rows], train_transform(t, seed))
    done = load_resume(out, model, ema)
    if done.epoch:
        print(f"{job.name}: resuming after epoch {done.epoch}")

    cache = TrunkCache(model, images, tr_rows, va_rows, t, job.device, cfg.data.cache_dir)
    epoch = 0
    for pi, phase in enumerate(phases):
        if epoch + phase.epochs <= done.epoch:
            epoch += phase.epochs
            cache.note_trained(frozen_prefix_length(model, phase.unfreeze))
            continue
        optim = start_phase(job, model, pi, phase, len(train_ds), done, ema)
        trunk = phase_trunk(cache, model, phases, pi) if t.cache_frozen else None
        for _ in range(phase.epochs):
            if epoch < done.epoch:
                epoch += 1
                continue
            epoch_seed = seed * 100 + epoch
            seed_everything(epoch_seed)
            if trunk is None:
                batches = make_loader(train_ds, batch_size, True, workers, epoch_seed, job.device.type == "cuda")
                forward = lambda x: model(to_model_input(x, job.device), raw=True)  # noqa: E731
            else:
                batches = trunk.batches(train_ds.age, train_ds.gender, batch_size, epoch_seed)
                forward = partial(trunk.forward, model)
            t0 = time.perf_counter()
            desc = f"{job.name} e{epoch + 1}"
            seen, loss_sum = train_one_epoch(
                forward, batches, optim, objective, job.autocast, desc, t.mixup, epoch_seed
            )
            train_time = time.perf_counter() - t0
            eval_model = ema.module if ema is not None else model
            va_age, va_prob = validate(job, eval_model, trunk, va_rows, scale)
            m = evaluate(age[va_rows], va_age, gender[va_rows], va_prob)
            epoch += 1
            row = {
                "epoch": epoch,
                "phase": pi + 1,
                "train": phase.train,
                "lr": phase.lr,
                "lr_end": optim.opt.param_groups[0]["lr"],
                "train_loss": loss_sum / max(1, seen),
                "val_loss": objective.on_predictions(scale, va_age, va_prob, age[va_rows], gender[va_rows]),
                **{f"val_{k}": v for k, v in m.items()},
                "img_per_s": seen / train_time,
                "seconds": time.perf_counter() - t0,
            }
            improved = t.select == "last" or is_better(cfg.metric, m[cfg.metric], done.best)
            done.epoch, done.history = epoch, [*done.history, row]
            best_state = None
            if improved:
                done.best = m[cfg.metric]
                best_state = {
                    "model": eval_model.state_dict(),
                    "age_mean": scale.mean,
                    "age_std": scale.std,
                    "age_head": job.model.age_head,
                    "epoch": epoch,
                    cfg.metric: done.best,
                }
            save_epoch(out, model, optim, pi, done, best_state)
            job.tracker.log({**row, "fold": job.fold}, step=epoch)
            print(
                f"{job.name} epoch {epoch}: loss {row['train_loss']:.4f} val MAE {m['mae']:.2f} "
                f"acc {m['accuracy']:.3f} {cfg.metric} {m[cfg.metric]:.4f}{' *' if improved else ''} "
                f"({row['img_per_s']:.0f} img/s, {row['seconds']:.0f}s)"
            )
    finish_fold(job, done)


def finish_fold(job: FoldJob, done: Progress) -> None:
    """train_done.json names the epoch best.pt holds (read from best.pt itself, which survives resumes)."""
    metric = job.cfg.metric
    best_epoch = checkpoint_epoch(job.out / "best.pt")
    best_row = next(r for r in done.history if r["epoch"] == best_epoch)
    job.tracker.summary({f"best_{k}": v for k, v in best_row.items()})
    write_text(json.dumps({"best_epoch": best_epoch, metric: done.best}), job.out / "train_done.json")
    (job.out / "last.pt").unlink(missing_ok=True)
