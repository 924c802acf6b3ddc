"""Train one backbone on one fold: gradual-unfreezing phases, AdamW + per-phase cosine, best
checkpoint by the fold's validation metric, per-epoch metrics CSV, resumable from the last epoch.

FoldTrainer holds a fold's state and runs its epochs (fit); what else happens at an epoch's end (the progress line,
W&B, Tune's report, a time budget) takes part as an epoch-end callback."""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..core.config import Phase, TrainConfig
from ..core.files import write_text
from ..core.layout import BEST, LAST, START_WEIGHTS, TRAIN_DONE, TrainDone, best_checkpoint
from ..core.metrics import evaluate, is_better
from ..models.backbones import create_model, weights_record
from ..models.network import AgeGenderNet
from ..models.stages import frozen_prefix_length, set_trainable
from .checkpoint import Progress, checkpoint_epoch, read_last, save_epoch
from .evaluation import Validation, validate_cached, validate_images
from .job import FoldJob, Inference, autocast
from .loader import (
    FaceDataset,
    LoaderSettings,
    auto_workers,
    make_loader,
    to_model_input,
    train_transform,
    training_batches,
)
from .losses import AgeScale, Objective
from .pseudo import TrainingRows, stage_pseudo_labels, with_pseudo_labels
from .trunk import CachedTrunk, TrunkCache, TrunkStore

BAR_EVERY = 20  # steps between progress-bar updates (each reads the running loss back from the device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(steps: int, warmup_frac: float):
    """lr factor per step: linear warm-up over warmup_frac of the steps, then cosine to 0."""
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor


@dataclass
class Optimiser:
    """A phase's optimiser and lr schedule, with the fold-wide EMA, stepped together on the model."""

    model: AgeGenderNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEmaV3 | None
    step: int  # global step of the fold (drives the EMA warm-up)
    grad_clip: float
    scaler: torch.amp.GradScaler | None = None  # fp16: the fold's loss scale (saved in last.pt)

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)  # clip the true gradients
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        if self.scaler is None:
            self.opt.step()
            self.sched.step()
        else:
            self.scaler.step(self.opt)  # skipped when the scaled gradients overflowed (the scale then drops)
            self.scaler.update()
            with warnings.catch_warnings():  # the schedule goes on over a skipped step, as in timm's and Lightning's
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)  # warm-up: early EMA follows the model closely
        self.step += 1


@dataclass(frozen=True)
class EpochStep:
    """What a training step runs on a batch: the forward pass (whole model, or the stages above a cached trunk), the
    loss, the autocast precision and the mixup Beta parameter (0: none)."""

    forward: Callable
    objective: Objective
    precision: torch.dtype | None = None
    mixup: float = 0.0


def train_one_epoch(step: EpochStep, batches, optim: Optimiser, desc: str, seed: int = 0) -> tuple[int, float]:
    """One pass over `batches` (images or cached trunk outputs). Returns (images seen, summed loss). With mixup > 0
    each batch is mixed with a shuffled copy of itself, weight lam ~ Beta(mixup, mixup), and the loss is the same
    mix of the losses against both label sets (for cached phases the trunk outputs are mixed: manifold mixup).
    Batches are mixed on the device, and the loss is summed there: read once per epoch (and every BAR_EVERY steps
    when a progress bar is shown), so steps queue on a GPU without waiting for each other."""
    t0, seen, mixup = time.perf_counter(), 0, step.mixup
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None)
    device = next(optim.model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rng = np.random.default_rng(seed)
    for i, (x, y_age, y_gender) in enumerate(bar, 1):
        x = x.to(device, non_blocking=True)
        y_age, y_gender = y_age.to(device, non_blocking=True), y_gender.to(device, non_blocking=True)
        if mixup > 0:
            lam, perm = float(rng.beta(mixup, mixup)), torch.from_numpy(rng.permutation(len(x))).to(device)
            x = x.float() * lam + x.float()[perm] * (1 - lam)
        with autocast(device, step.precision):
            pred_age, logit = step.forward(x)
        loss = step.objective(pred_age, logit, y_age, y_gender)
        if mixup > 0:
            loss = lam * loss + (1 - lam) * step.objective(pred_age, logit, y_age[perm], y_gender[perm])
        optim.update(loss)
        seen += len(x)
        loss_sum += loss.detach().double() * len(x)
        if not bar.disable and i % BAR_EVERY == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    return seen, loss_sum.item()


@dataclass
class FoldModel:
    """The fold's network, its EMA copy (train.ema > 0) and fp16's gradient scaler: what a checkpoint saves."""

    model: AgeGenderNet
    ema: ModelEmaV3 | None = None
    scaler: torch.amp.GradScaler | None = None

    @torch.no_grad()
    def sync_frozen_ema(self) -> None:
        """Set the EMA copy of every frozen module to the live weights. They no longer change, so their average
        would converge there anyway; now the EMA model and a frozen trunk cached from the live model agree."""
        if self.ema is None:
            return
        ema_modules = dict(self.ema.module.named_modules())
        for name, module in self.model.named_modules():
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                target = ema_modules[name]
                for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    getattr(target, key).copy_(value)

    def resume(self, out: Path) -> Progress:
        """The weights, EMA and loss scale of out/last.pt, and where the fold stopped (a fresh Progress without it)."""
        state, progress = read_last(out)
        if state is not None:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        return progress

    def start_phase(self, job: FoldJob, pi: int, phase: Phase, n_train: int, resume: Progress) -> Optimiser:
        """Freeze what the phase keeps frozen, a fresh optimiser and schedule (or the saved ones mid-phase)."""
        t, model = job.cfg.train, self.model
        n_trainable = set_trainable(model, phase.unfreeze)
        self.sync_frozen_ema()
        opt = create_optimizer_v2(model, "adamw", lr=phase.lr, weight_decay=t.weight_decay)
        steps_per_epoch = training_batches(n_train, job.cfg.batch_size(job.model))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(phase.epochs * steps_per_epoch, t.warmup_frac))
        if resume.phase == pi and resume.optimizer is not None:
            opt.load_state_dict(resume.optimizer)
            sched.load_state_dict(resume.scheduler)
        phases = [p for p in job.cfg.phases(job.model) if p.epochs > 0]
        print(
            f"{job.name}: phase {pi + 1}/{len(phases)} train={phase.train} lr={phase.lr:g} "
            f"epochs={phase.epochs} trainable params={n_trainable:,}"
        )
        first_step = sum(training_batches(n_train, job.cfg.batch_size(job.model)) * p.epochs for p in phases[:pi])
        return Optimiser(model, opt, sched, self.ema, first_step + sched.last_epoch, t.grad_clip, self.scaler)

    @property
    def for_eval(self) -> AgeGenderNet:
        """What is validated and saved as best.pt: the EMA model when there is one."""
        return self.ema.module if self.ema is not None else self.model


def validate(job: FoldJob, eval_model, trunk: CachedTrunk | None, fs: FoldSet, loader=None) -> tuple:
    """Validation predictions (no TTA) of the fold's validation rows, from the cache when the phase has one, and
    the training objective on them (un-augmented, unsmoothed)."""
    how, s, va = Inference.for_job(job), fs.scale, fs.va_rows
    val = Validation(fs.objective, s, fs.age[va], fs.gender[va])
    if trunk is not None:
        return validate_cached(eval_model, trunk, how, val)
    return validate_images(eval_model, loader, how, val)


@dataclass
class FoldSet:
    """What one fold trains and validates on: rows of `images` and every row's labels (years, 0/1 or a pseudo-label's
    probability), the age scale and the loss, both fitted on the fold's real training labels only."""

    images: np.ndarray
    tr_rows: np.ndarray
    va_rows: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    scale: AgeScale
    objective: Objective

    def dataset(self, t: TrainConfig, seed: int) -> FaceDataset:
        tr, transform = self.tr_rows, train_transform(t, seed)
        return FaceDataset(self.images, tr, self.scale.to_target(self.age[tr]), self.gender[tr], transform)


def fold_set(job: FoldJob) -> FoldSet:
    t = job.cfg.train
    tr_rows, va_rows = job.rows()
    age = job.comp.train.age.to_numpy(np.float32)
    gender = job.comp.train.gender.to_numpy(np.float32)
    scale = AgeScale.fit(age[tr_rows], t.normalize_age and job.model.age_head == "regression")
    objective = Objective.of(t, scale, float(age[tr_rows].std() + 1e-6), job.model.age_head)
    return FoldSet(job.images.train, tr_rows, va_rows, age, gender, scale, objective)


def with_pseudo_rows(job: FoldJob, fs: FoldSet) -> FoldSet:
    """The fold's set with the test images appended as training rows, labelled by the teacher (training/pseudo.py)."""
    stage_pseudo_labels(job.out.parents[1], job.model, job.fold)
    test_ids = job.comp.test.id.to_numpy()
    images, tr_rows, age, gender = with_pseudo_labels(
        job.out, test_ids, job.images.test, TrainingRows(fs.images, fs.tr_rows, fs.age, fs.gender)
    )
    print(f"{job.name}: + {len(test_ids)} test images pseudo-labelled by {job.model.pseudo_labels} fold {job.fold}")
    return replace(fs, images=images, tr_rows=tr_rows, age=age, gender=gender)


def new_model(job: FoldJob, fs: FoldSet) -> AgeGenderNet:
    """The fold's network (timm's init and the backbone's starting weights, unless the fold resumes from last.pt; what
    they were is saved in START_WEIGHTS), its CORAL biases at the training prior."""
    fresh = not (job.out / LAST).is_file()
    model = create_model(replace(job.model, img_size=job.cfg.img_size(job.model)), load_weights=fresh)
    if fresh:
        write_text(json.dumps(weights_record(model)), job.out / START_WEIGHTS)
    if job.model.age_head == "coral":
        model.age_head.start_at(fs.age[fs.tr_rows])
    return model


@dataclass(frozen=True)
class EpochEnd:
    """What an epoch-end callback is given: the epoch's metrics.csv row, its validation metrics, and whether it was
    kept as best.pt. The epoch is saved (last.pt, best.pt, metrics.csv) before any callback runs."""

    epoch: int
    row: dict
    metrics: dict
    kept: bool


EpochCallback = Callable[["FoldTrainer", EpochEnd], None]


def print_epoch(trainer: FoldTrainer, end: EpochEnd) -> None:
    metric, m, row = trainer.job.cfg.metric, end.metrics, end.row
    print(
        f"{trainer.job.name} epoch {end.epoch}: loss {row['train_loss']:.4f} val MAE {m['mae']:.2f} "
        f"acc {m['accuracy']:.3f} {metric} {m[metric]:.4f}{' *' if end.kept else ''} "
        f"({row['img_per_s']:.0f} img/s, {row['seconds']:.0f}s)"
    )


def track_epoch(trainer: FoldTrainer, end: EpochEnd) -> None:
    trainer.job.tracker.log({**end.row, "fold": trainer.job.fold}, step=end.epoch)


def train_fold(job: FoldJob, callbacks: Sequence[EpochCallback] = ()) -> None:
    """Train the fold's phases (resuming after the last finished epoch), then mark it trained."""
    if (job.out / TRAIN_DONE).is_file():
        print(f"{job.name}: already trained, skipping")
        return
    FoldTrainer(job, [track_epoch, print_epoch, *callbacks]).fit()


class FoldTrainer:
    """One fold's training and what it holds while it runs: the job, its rows and labels (data), the image loaders,
    the network with its EMA and loss scale (net), the frozen-trunk cache and the progress a kill resumes from.
    fit() runs the phases' epochs one after another; the callbacks run at each epoch's end, after it is saved."""

    def __init__(self, job: FoldJob, callbacks: Sequence[EpochCallback] = ()):
        t = job.cfg.train
        self.job, self.callbacks = job, list(callbacks)
        job.out.mkdir(parents=True, exist_ok=True)
        self.seed = t.seed * 1000 + job.fold
        seed_everything(self.seed)
        self.data = fold_set(job)
        model = new_model(job, self.data)
        if job.model.pseudo_labels:  # the scale and the head's start above come from the real labels only
            self.data = with_pseudo_rows(job, self.data)
        model = model.to(job.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = ModelEmaV3(model, decay=t.ema, use_warmup=True) if t.ema > 0 else None
        train_ds = self.data.dataset(t, self.seed)
        scaler = torch.amp.GradScaler(job.device.type) if job.precision == torch.float16 else None
        self.net = FoldModel(model, ema, scaler)
        self.progress = self.net.resume(job.out)
        if self.progress.epoch:
            print(f"{job.name}: resuming after epoch {self.progress.epoch}")
        self.n_train = len(train_ds)
        self.loaders = FoldLoaders.of(job, self.data, train_ds)
        self.phases = [p for p in job.cfg.phases(job.model) if p.epochs > 0]
        d = self.data
        store = TrunkStore(job.cfg.data.cache_folder, d.images, t, job.precision)
        self.cache = TrunkCache(model, store, rows=(d.tr_rows, d.va_rows), device=job.device)

    def fit(self) -> None:
        """Every epoch not yet finished, phase by phase; then train_done.json."""
        epoch, model = 0, self.net.model
        for pi, phase in enumerate(self.phases):
            if epoch + phase.epochs <= self.progress.epoch:  # finished before a kill
                epoch += phase.epochs
                self.cache.note_trained(frozen_prefix_length(model, phase.unfreeze))
                continue
            optim = self.net.start_phase(self.job, pi, phase, self.n_train, self.progress)
            trunk = self.cache.for_phases(model, self.phases, pi) if self.job.cfg.train.cache_frozen else None
            forward = phase_forward(self.job, model, trunk)
            step = EpochStep(forward, self.data.objective, self.job.precision, self.job.cfg.train.mixup)
            for _ in range(phase.epochs):
                if epoch >= self.progress.epoch:
                    end = self.run_epoch(step, optim, trunk, pi, self.seed * 100 + epoch)
                    for callback in self.callbacks:
                        callback(self, end)
                epoch += 1
        self.finish()

    def run_epoch(self, step: EpochStep, optim: Optimiser, trunk: CachedTrunk | None, pi: int, seed: int) -> EpochEnd:
        """Train one epoch, validate it and save it (best.pt when it is kept, last.pt, metrics.csv)."""
        job, fs, done = self.job, self.data, self.progress
        cfg, phase, epoch = job.cfg, self.phases[pi], done.epoch + 1
        seed_everything(seed)
        batches = self.loaders.epoch(trunk, seed)
        t0 = time.perf_counter()
        seen, loss_sum = train_one_epoch(step, batches, optim, f"{job.name} e{epoch}", seed)
        train_time = time.perf_counter() - t0
        eval_model = self.net.for_eval
        va = fs.va_rows
        va_age, va_prob, val_loss = validate(job, eval_model, trunk, fs, self.loaders.val)
        m = evaluate(fs.age[va], va_age, fs.gender[va], va_prob)
        row = {
            "epoch": epoch,
            "phase": pi + 1,
            "train": phase.train,
            "lr": phase.lr,
            "lr_end": optim.opt.param_groups[0]["lr"],
            "train_loss": loss_sum / max(1, seen),
            "val_loss": val_loss,  # the objective trained on, on the validation rows; val_mae etc. in years
            **{f"val_{k}": v for k, v in m.items()},
            "img_per_s": seen / train_time,
            "seconds": time.perf_counter() - t0,
        }
        kept = cfg.train.select == "last" or is_better(cfg.metric, m[cfg.metric], done.best)
        done.epoch, done.history = epoch, [*done.history, row]
        best_state = None
        if kept:
            done.best = m[cfg.metric]
            s, head = fs.scale, job.model.age_head
            best_state = best_checkpoint(eval_model.state_dict(), s.mean, s.std, head, epoch, cfg.metric, done.best)
        save_epoch(job.out, optim.model, optim, pi, done, best_state)
        return EpochEnd(epoch, row, m, kept)

    def finish(self) -> None:
        """train_done.json names the epoch best.pt holds (read from best.pt itself, which survives resumes)."""
        job, done = self.job, self.progress
        best_epoch = checkpoint_epoch(job.out / BEST)
        best_row = next(r for r in done.history if r["epoch"] == best_epoch)
        job.tracker.summary({f"best_{k}": v for k, v in best_row.items()})
        TrainDone(best_epoch, job.cfg.metric, done.best).write(job.out)
        (job.out / LAST).unlink(missing_ok=True)


@dataclass
class FoldLoaders:
    """The fold's image loaders, built once: their workers (num_workers > 0) live across epochs and phases."""

    train: DataLoader
    val: DataLoader
    batch_size: int

    @classmethod
    def of(cls, job: FoldJob, fs: FoldSet, train_ds: FaceDataset) -> FoldLoaders:
        how, cuda, bs = Inference.for_job(job), job.device.type == "cuda", job.cfg.batch_size(job.model)
        workers = auto_workers(job.cfg.train.num_workers)
        train_settings = LoaderSettings(workers, pin_memory=cuda, persistent=True)
        train = make_loader(train_ds, bs, train=True, settings=train_settings)
        val_ds = FaceDataset(fs.images, fs.va_rows)
        val_settings = LoaderSettings(how.workers, pin_memory=cuda, persistent=True)
        val = make_loader(val_ds, how.batch_size, train=False, settings=val_settings)
        return cls(train, val, bs)

    def epoch(self, trunk: CachedTrunk | None, epoch_seed: int):
        """One epoch's training batches: augmented images, or the cached trunk outputs of a random view of each."""
        if trunk is None:
            self.train.batch_sampler.set_epoch(epoch_seed)
            return self.train
        ds = self.train.dataset
        return trunk.batches(ds.age, ds.gender, self.batch_size, epoch_seed)


def phase_forward(job: FoldJob, model: AgeGenderNet, trunk: CachedTrunk | None):
    """What a phase's training step runs on a batch: the whole model on images, or the stages above the cached
    trunk on its outputs; compiled (torch.compile) with train.compile. The model itself is not wrapped, so its
    checkpoints and exports are the same either way."""
    if trunk is None:
        forward = partial(_images_forward, model, job.device)
    else:
        forward = partial(trunk.forward, model)
    return torch.compile(forward) if job.cfg.train.compile else forward


def _images_forward(model: AgeGenderNet, device: torch.device, x: torch.Tensor):
    return model(to_model_input(x, device), raw=True)
