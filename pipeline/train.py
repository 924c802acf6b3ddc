"""Train one backbone on one fold: gradual-unfreezing phases, AdamW + per-phase cosine, best
checkpoint by the fold's validation metric, per-epoch metrics CSV, resumable from the last epoch."""

from __future__ import annotations

import json
import math
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from .config import Config, ModelConfig, Phase, TrainConfig
from .data import Competition
from .errors import PipelineError
from .files import save_torch, write_csv, write_text
from .loader import FaceDataset, auto_workers, make_loader, to_model_input, train_transform
from .metrics import evaluate, is_better
from .models import AgeGenderNet, create_model, frozen_prefix_length, set_trainable, trunk_stages
from .predict import predict_arrays
from .tracking import Tracker

SMOOTH_L1_BETA = 0.25  # on the normalised age scale (about 5 years on UTKFace)


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def age_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA)


def warmup_cosine(steps: int, warmup_frac: float):
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor


class CachedTrunk:
    """Outputs of a phase's frozen trunk prefix, computed once (eval mode, no augmentation) and reused by
    every epoch of the phase. Augmentation on them: a random horizontal flip of the feature maps."""

    def __init__(self, k: int, train: torch.Tensor, val: torch.Tensor):
        self.k, self.train, self.val = k, train, val

    def forward(self, model: AgeGenderNet, h: torch.Tensor):
        h = h.float()
        for stage in trunk_stages(model)[self.k :]:
            h = stage(h)
        return model.heads(h)

    def batches(self, age: np.ndarray, gender: np.ndarray, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train), generator=g)
        flip = torch.rand(len(self.train), generator=g) < 0.5
        age_t, gender_t = torch.from_numpy(age), torch.from_numpy(gender)
        n_full = len(order) // batch_size * batch_size if len(order) > batch_size else len(order)
        for i in range(0, n_full, batch_size):
            idx = order[i : i + batch_size]
            h = self.train[idx]
            if h.ndim == 4:
                h = torch.where(flip[idx].view(-1, 1, 1, 1).to(h.device), h.flip(3), h)
            yield h, age_t[idx], gender_t[idx]

    @torch.no_grad()
    def predict_val(self, model: AgeGenderNet, batch_size: int, age_mean: float, age_std: float):
        was_training = model.training
        model.eval()
        ages, probs = [], []
        for i in range(0, len(self.val), batch_size):
            a, g = self.forward(model, self.val[i : i + batch_size])
            ages.append(a.float().cpu().numpy() * age_std + age_mean)
            probs.append(torch.sigmoid(g.float()).cpu().numpy())
        model.train(was_training)
        return np.concatenate(ages), np.concatenate(probs)


class TrunkCache:
    """Frozen-trunk outputs shared by a fold's head / last:N phases. The prefix is computed once at the
    deepest cut that the coming cached phases need; a later phase with a shallower trainable part derives its
    inputs from it (running only the stages in between), as long as those stages have not been trained since."""

    def __init__(self, model: AgeGenderNet, images: np.ndarray, tr_rows, va_rows, batch_size: int, device):
        self.model, self.images, self.rows = model, images, (tr_rows, va_rows)
        self.batch_size, self.device = batch_size, device
        self.stages = trunk_stages(model)
        self.base: CachedTrunk | None = None
        self.trained_from = 10**9  # lowest stage index trained since `base` was computed

    @torch.no_grad()
    def for_phase(self, k: int, k_min_ahead: int) -> CachedTrunk | None:
        """Cached inputs for a phase that keeps the first k stages frozen (None: no caching)."""
        if self.stages is None or k == 0:
            self.trained_from = 0
            return None
        t0 = time.perf_counter()
        if self.base is None or self.base.k > k or self.trained_from < k:
            k0 = min(k, k_min_ahead)
            self.base = CachedTrunk(k0, self._from_images(self.rows[0], k0), self._from_images(self.rows[1], k0))
            self.trained_from = 10**9
        if self.base.k == k:
            trunk = self.base
        else:
            trunk = CachedTrunk(k, self._derive(self.base.train, k), self._derive(self.base.val, k))
        self.trained_from = min(self.trained_from, k)
        mb = (trunk.train.numel() + trunk.val.numel()) * 2 / 2**20
        print(
            f"  frozen trunk ({k} stages) run once for the phase: {tuple(trunk.train.shape[1:])} per image, "
            f"{mb:.0f} MB, {time.perf_counter() - t0:.0f}s"
        )
        return trunk

    def _from_images(self, rows: np.ndarray, k: int) -> torch.Tensor:
        out = []
        loader = make_loader(FaceDataset(self.images, rows), self.batch_size * 2, False, 0, 0)
        for x, _, _ in tqdm(loader, desc="frozen trunk", unit="batch", leave=False, disable=None):
            h = (to_model_input(x, self.device).float() - self.model.mean) / self.model.std
            for stage in self.stages[:k]:
                h = stage(h)
            out.append(h.to(torch.float16))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float16)

    def _derive(self, base: torch.Tensor, k: int) -> torch.Tensor:
        if len(base) == 0:
            return base
        out = []
        for i in range(0, len(base), self.batch_size * 2):
            h = base[i : i + self.batch_size * 2].float()
            for stage in self.stages[self.base.k : k]:
                h = stage(h)
            out.append(h.to(torch.float16))
        return torch.cat(out)


def train_one_epoch(
    model, forward, batches, opt, sched, ema, t: TrainConfig, device, desc: str, first_step: int = 0
) -> tuple[int, float]:
    """One pass over `batches` (images or cached trunk outputs). Returns (images seen, summed loss)."""
    step = first_step
    amp = device.type == "cuda" and t.amp
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None)
    for x, y_age, y_gender in bar:
        y_age, y_gender = y_age.to(device), y_gender.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred_age, logit = forward(x)
        loss = age_loss(t.age_loss, pred_age.float(), y_age)
        loss = loss + t.gender_weight * F.binary_cross_entropy_with_logits(logit.float(), y_gender)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model, step=step)  # warm-up: early EMA follows the model closely
        step += 1
        seen += len(x)
        loss_sum += loss.item() * len(x)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    return seen, loss_sum


def validation_loss(t: TrainConfig, age_pred, prob, age_true, gender_true, age_mean: float, age_std: float) -> float:
    """The training objective on the validation rows, from their predictions."""
    a = torch.from_numpy((np.asarray(age_pred) - age_mean) / age_std).float()
    y = torch.from_numpy((np.asarray(age_true) - age_mean) / age_std).float()
    p = torch.from_numpy(np.clip(np.asarray(prob), 1e-7, 1 - 1e-7)).float()
    g = torch.from_numpy(np.asarray(gender_true)).float()
    return float(age_loss(t.age_loss, a, y) + t.gender_weight * F.binary_cross_entropy(p, g))


def fold_rows(comp: Competition, folds: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    fold_of = dict(zip(folds.id, folds.fold))
    f = np.array([fold_of.get(i, -1) for i in comp.train.id])
    train, val = np.flatnonzero((f != fold) & (f >= 0)), np.flatnonzero(f == fold)
    if len(val) == 0 or len(train) == 0:
        raise PipelineError(
            f"fold {fold} has {len(train)} training and {len(val)} validation images left "
            "(unreadable images skipped?); use fewer folds or fix the images"
        )
    return train, val


def train_fold(
    cfg: Config,
    mcfg: ModelConfig,
    fold: int,
    comp: Competition,
    images: np.ndarray,
    folds: pd.DataFrame,
    out: Path,
    device: torch.device,
    tracker: Tracker,
) -> None:
    if (out / "train_done.json").is_file():
        print(f"{mcfg.name} fold {fold}: already trained, skipping")
        return
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    seed = t.seed * 1000 + fold
    seed_everything(seed)
    tr_rows, va_rows = fold_rows(comp, folds, fold)
    age = comp.train.age.to_numpy(np.float32)
    gender = comp.train.gender.to_numpy(np.float32)
    age_mean, age_std = (
        (float(age[tr_rows].mean()), float(age[tr_rows].std() + 1e-6)) if t.normalize_age else (0.0, 1.0)
    )

    model = create_model(mcfg).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema, use_warmup=True) if t.ema > 0 else None
    phases: list[Phase] = [p for p in cfg.phases(mcfg) if p.epochs > 0]
    batch_size = mcfg.batch_size or t.batch_size
    workers = auto_workers(t.num_workers)
    train_ds = FaceDataset(
        images, tr_rows, (age[tr_rows] - age_mean) / age_std, gender[tr_rows], train_transform(t, seed)
    )

    history: list[dict] = []
    best: float | None = None
    done_epochs = 0
    resume = None
    if (out / "last.pt").is_file():
        resume = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(resume["model"])
        if ema is not None and resume.get("ema") is not None:
            ema.load_state_dict(resume["ema"])
        history, best, done_epochs = resume["history"], resume["best"], resume["epoch"]
        if (out / "best.pt").is_file():
            best_epoch = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["epoch"]
            if best_epoch > done_epochs:  # killed between saving best.pt and last.pt: that epoch runs again
                best = None
        print(f"{mcfg.name} fold {fold}: resuming after epoch {done_epochs}")

    trunk_cache = TrunkCache(model, images, tr_rows, va_rows, batch_size, device)
    epoch = 0
    for pi, phase in enumerate(phases):
        if epoch + phase.epochs <= done_epochs:
            epoch += phase.epochs
            continue
        n_trainable = set_trainable(model, phase.train)
        opt = create_optimizer_v2(model, "adamw", lr=phase.lr, weight_decay=t.weight_decay)
        steps_per_epoch = max(1, len(train_ds) // batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(phase.epochs * steps_per_epoch, t.warmup_frac))
        if resume is not None and resume["phase"] == pi and done_epochs > epoch:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        print(
            f"{mcfg.name} fold {fold}: phase {pi + 1}/{len(phases)} train={phase.train} lr={phase.lr:g} "
            f"epochs={phase.epochs} trainable params={n_trainable:,}"
        )
        trunk = None
        if t.cache_frozen:
            ahead = [frozen_prefix_length(model, q.train) for q in phases[pi:]]
            ahead = ahead[: ahead.index(0)] if 0 in ahead else ahead
            trunk = trunk_cache.for_phase(frozen_prefix_length(model, phase.train), min(ahead or [0]))
        for _ in range(phase.epochs):
            if epoch < done_epochs:
                epoch += 1
                continue
            epoch_seed = seed * 100 + epoch
            seed_everything(epoch_seed)
            set_trainable(model, phase.train)  # re-applies eval mode to frozen modules
            if trunk is None:
                batches = make_loader(train_ds, batch_size, True, workers, epoch_seed)
            else:
                batches = trunk.batches(train_ds.age, train_ds.gender, batch_size, epoch_seed)
            t0 = time.perf_counter()
            forward = (lambda x: model(to_model_input(x, device))) if trunk is None else partial(trunk.forward, model)
            desc = f"{mcfg.name} f{fold} e{epoch + 1}"
            seen, loss_sum = train_one_epoch(
                model, forward, batches, opt, sched, ema, t, device, desc, first_step=epoch * steps_per_epoch
            )
            train_time = time.perf_counter() - t0
            eval_model = ema.module if ema is not None else model
            if trunk is None:
                va_age, va_prob = predict_arrays(
                    eval_model, images, va_rows, ["none"], batch_size * 2, device, age_mean, age_std
                )
            else:
                va_age, va_prob = trunk.predict_val(eval_model, batch_size * 2, age_mean, age_std)
            m = evaluate(age[va_rows], va_age, gender[va_rows], va_prob)
            val_loss = validation_loss(t, va_age, va_prob, age[va_rows], gender[va_rows], age_mean, age_std)
            epoch += 1
            row = {
                "epoch": epoch,
                "phase": pi + 1,
                "train": phase.train,
                "lr": phase.lr,
                "lr_end": opt.param_groups[0]["lr"],
                "train_loss": loss_sum / max(1, seen),
                "val_loss": val_loss,
                **{f"val_{k}": v for k, v in m.items()},
                "img_per_s": seen / train_time,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            improved = is_better(cfg.metric, m[cfg.metric], best)
            if improved:
                best = m[cfg.metric]
                save_torch(
                    {
                        "model": eval_model.state_dict(),
                        "age_mean": age_mean,
                        "age_std": age_std,
                        "epoch": epoch,
                        cfg.metric: best,
                    },
                    out / "best.pt",
                )
            save_torch(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "phase": pi,
                    "epoch": epoch,
                    "best": best,
                    "history": history,
                },
                out / "last.pt",
            )
            write_csv(pd.DataFrame(history), out / "metrics.csv")
            tracker.log({**row, "fold": fold}, step=epoch)
            print(
                f"{mcfg.name} fold {fold} epoch {epoch}: loss {row['train_loss']:.4f} val MAE {m['mae']:.2f} "
                f"acc {m['accuracy']:.3f} {cfg.metric} {m[cfg.metric]:.4f}{' *' if improved else ''} "
                f"({row['img_per_s']:.0f} img/s, {row['seconds']:.0f}s)"
            )
    best_row = max(history, key=lambda r: r[f"val_{cfg.metric}"] * (1 if is_better(cfg.metric, 1, 0) else -1))
    tracker.summary({f"best_{k}": v for k, v in best_row.items()})
    write_text(json.dumps({"best_epoch": best_row["epoch"], cfg.metric: best}), out / "train_done.json")
    (out / "last.pt").unlink(missing_ok=True)
