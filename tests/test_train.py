"""Unit tests of the training stage: fold rows, phases, optimiser, lr schedule, frozen trunk cache, EMA, resume."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.core.config import Config, ModelConfig, Phase, TrainConfig, Unfreeze
from pipeline.core.errors import PipelineError
from pipeline.core.tracking import Tracker
from pipeline.data.cache import Images
from pipeline.data.competition import Competition
from pipeline.inference.predict import load_best, predict_fold
from pipeline.models.backbones import create_model
from pipeline.models.network import DLDL_MAX_AGE, AgeGenderNet, CoralHead
from pipeline.models.stages import backbone_groups, evaluating, set_trainable, trunk_stages
from pipeline.training import losses as loss_fns
from pipeline.training import train as train_mod
from pipeline.training.checkpoint import Progress
from pipeline.training.evaluation import AgeUnits, predict_arrays, predict_cached
from pipeline.training.job import FoldJob, Inference, fold_rows
from pipeline.training.loader import FaceDataset, LoaderSettings, make_loader, train_transform
from pipeline.training.losses import AgeScale, LossSum, Objective
from pipeline.training.train import EpochStep, FoldModel, train_fold, warmup_cosine
from pipeline.training.trunk import CachedTrunk, TrunkCache, TrunkStore

N, SIZE = 48, 32


def _job(tmp_path, phases, **train) -> FoldJob:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (N, SIZE, SIZE, 3), dtype=np.uint8)
    ages = rng.uniform(1, 80, N).astype(np.float32)
    for i, a in enumerate(ages):  # something to learn: brightness follows age
        images[i] = np.clip(images[i] // 4 + int(a * 2), 0, 255)
    comp = Competition(
        "synthetic",
        pd.DataFrame({"id": [f"im{i:02d}" for i in range(N)], "age": ages, "gender": rng.integers(0, 2, N)}),
        pd.DataFrame({"id": ["t0"], "path": [""]}),
    )
    folds = pd.DataFrame({"id": comp.train.id, "fold": np.arange(N) % 3})
    model = ModelConfig(name="scratch_cnn", pretrained=False, phases=phases)
    cfg = Config(models=[model], train=TrainConfig(**{"batch_size": 8, "num_workers": 0, **train}))
    cfg.data.img_size = SIZE
    cfg.data.cache_dir = str(tmp_path / "cache")
    tracker = Tracker(cfg, "t", "train", tmp_path, enabled=False)
    return FoldJob(
        cfg, model, 0, comp, Images(images, images[:1]), folds, tmp_path / "fold0", torch.device("cpu"), tracker
    )


def _cache(job, model) -> TrunkCache:
    tr, va = job.rows()
    store = TrunkStore(job.cfg.data.cache_dir, job.images.train, job.cfg.train)
    return TrunkCache(model, store, rows=(tr, va), device=job.device)


def _metrics(job) -> pd.DataFrame:
    return pd.read_csv(job.out / "metrics.csv").drop(columns=["img_per_s", "seconds"])


def test_fold_rows_split_the_training_set_without_overlap(tmp_path):
    job = _job(tmp_path, [Phase(1, "all", 1e-3)])
    ids = job.comp.train.id.to_numpy()
    for k in range(3):
        tr, va = fold_rows(job.comp, job.folds, k)
        assert not set(tr) & set(va) and len(tr) + len(va) == N
        assert set(ids[va]) == set(job.folds.id[job.folds.fold == k])


def test_unfreeze_is_parsed_once_and_counts_frozen_stages():
    assert Phase(1, "last:2").unfreeze == Unfreeze(2)
    assert Unfreeze.parse("head").frozen_prefix(5) == 5
    assert Unfreeze.parse("last:2").frozen_prefix(5) == 3
    assert Unfreeze.parse("last:9").frozen_prefix(5) == 0
    assert Unfreeze.parse("all").frozen_prefix(5) == 0


def test_warmup_then_cosine_lr_values():
    f = warmup_cosine(10, 0.2)  # 2 warm-up steps, then a cosine over 8 steps
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert all(f(s) > f(s + 1) for s in range(2, 9))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * f(s) for s in range(10)])


@pytest.mark.parametrize("what", ["head", "last:2", "all"])
def test_the_optimiser_holds_exactly_the_trainable_parameters(tmp_path, what):
    job = _job(tmp_path, [Phase(1, what, 1e-3)])
    model = create_model(job.model)
    optim = FoldModel(model).start_phase(job, 0, job.cfg.phases(job.model)[0], 32, Progress())
    in_opt = {id(p) for g in optim.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    n_backbone = sum(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    assert (n_backbone == 0) == (what == "head")


def test_frozen_batchnorm_statistics_and_weights_stay_put_through_an_epoch(tmp_path):
    job = _job(tmp_path, [Phase(1, "last:1", 1e-2)])
    model = create_model(job.model)
    optim = FoldModel(model).start_phase(job, 0, Phase(1, "last:1", 1e-2), N, Progress())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = FaceDataset(job.images.train, np.arange(N), np.zeros(N), np.zeros(N), train_transform(job.cfg.train, 0))
    forward = lambda x: model(x.permute(0, 3, 1, 2))  # noqa: E731
    objective = Objective.of(job.cfg.train, AgeScale(0.0, 1.0, 0.25))
    train_mod.train_one_epoch(EpochStep(forward, objective), make_loader(ds, 8, train=True, seed=1), optim, "")
    after = model.state_dict()
    frozen = [k for k in after if k.startswith(("backbone.stem", "backbone.stages.0", "backbone.stages.2"))]
    trained = [k for k in after if k.startswith("backbone.stages.3") and "running_mean" in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and running statistics
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def _epoch_of_one_batch(mixup: float, seed: int = 3):
    """One batch whose row i is all i and whose age label is i, through a linear layer; what the model and the
    loss were given."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    x, y = torch.arange(8.0)[:, None].repeat(1, 3), torch.arange(8.0)
    inputs, labels, losses = [], [], []

    def forward(xb):
        inputs.append(xb.clone())
        out = layer(xb).squeeze(1)
        return out, out

    def objective(pred, logit, y_age, y_gender):
        labels.append(y_age.clone())
        return ((pred - y_age) ** 2).mean()

    class Optim:
        model = layer

        def update(self, loss):
            losses.append(loss.item())

    train_mod.train_one_epoch(EpochStep(forward, objective, None, mixup), [(x, y, torch.zeros(8))], Optim(), "", seed)
    pred = layer(inputs[0]).squeeze(1).detach()
    return y, inputs[0][:, 0], labels, losses[0], pred


def test_mixup_mixes_each_batch_with_a_shuffled_copy_and_the_losses_alike():
    y, given, labels, loss, _ = _epoch_of_one_batch(0.0)
    assert torch.equal(given, y) and len(labels) == 1
    y, given, labels, loss, pred = _epoch_of_one_batch(0.4)
    shuffled = labels[1]
    assert len(labels) == 2 and torch.equal(labels[0], y) and not torch.equal(shuffled, y)
    assert torch.equal(shuffled.sort().values, y)  # a permutation of the batch's own labels
    lam = float(((given - shuffled) @ (y - shuffled)) / ((y - shuffled) @ (y - shuffled)))
    assert 0 < lam < 1 and torch.allclose(given, lam * y + (1 - lam) * shuffled, atol=1e-5)
    mixed_loss = lam * ((pred - y) ** 2).mean() + (1 - lam) * ((pred - shuffled) ** 2).mean()
    assert loss == pytest.approx(float(mixed_loss), rel=1e-5)
    assert torch.equal(_epoch_of_one_batch(0.4)[1], given)  # seeded: the same mix again
    assert not torch.equal(_epoch_of_one_batch(0.4, seed=4)[1], given)


def test_inference_restores_each_modules_mode(tmp_path):
    job = _job(tmp_path, [Phase(1, "last:1", 1e-3)])
    model = create_model(job.model)
    set_trainable(model, Unfreeze.parse("last:1"))
    modes = [m.training for m in model.modules()]
    predict_arrays(model, job.images.train, np.arange(4), Inference.for_job(job))
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes and model.backbone.stem[1].training is False


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_cached_and_uncached_validation_agree_after_training_below_the_cut(tmp_path, ema):
    """Phases [all, head] with EMA: the head phase's cache (from the live model) must fit the EMA model."""
    phases = [Phase(1, "all", 1e-2), Phase(1, "head", 1e-2)]
    job = _job(tmp_path, phases, ema=ema)
    model = create_model(job.model)
    ema_model = train_mod.ModelEmaV3(model, decay=ema, use_warmup=True) if ema else None
    optim = FoldModel(model, ema_model).start_phase(job, 0, phases[0], N, Progress())
    tr, va = job.rows()
    ds = FaceDataset(job.images.train, tr, np.zeros(len(tr)), np.zeros(len(tr)), train_transform(job.cfg.train, 0))
    forward = lambda x: model(x.permute(0, 3, 1, 2))  # noqa: E731
    objective = Objective.of(job.cfg.train, AgeScale(0.0, 1.0, 0.25))
    train_mod.train_one_epoch(EpochStep(forward, objective), make_loader(ds, 8, train=True, seed=1), optim, "")
    FoldModel(model, ema_model).start_phase(job, 1, phases[1], N, Progress())
    trunk = _cache(job, model).for_phases(model, phases, 1)
    eval_model = ema_model.module if ema else model
    how = Inference.for_job(job)
    cached = predict_cached(eval_model, trunk, how)
    uncached = predict_arrays(eval_model, job.images.train, va, how)
    np.testing.assert_allclose(cached[0], uncached[0], rtol=2e-2, atol=2e-2)  # the cache is stored in fp16
    np.testing.assert_allclose(cached[1], uncached[1], atol=2e-3)


def test_sync_frozen_ema_copies_only_frozen_modules(tmp_path):
    job = _job(tmp_path, [Phase(1, "head", 1e-3)])
    model = create_model(job.model)
    ema = train_mod.ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    set_trainable(model, Unfreeze.parse("last:1"))
    FoldModel(model, ema).sync_frozen_ema()
    live, avg = model.state_dict(), ema.module.state_dict()
    assert torch.equal(live["backbone.stem.0.weight"], avg["backbone.stem.0.weight"])
    assert not torch.equal(live["backbone.stages.3.0.weight"], avg["backbone.stages.3.0.weight"])
    assert not torch.equal(live["age_head.weight"], avg["age_head.weight"])


def _prefix(model, images: np.ndarray, k: int) -> torch.Tensor:
    with evaluating(model), torch.no_grad():
        h = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - model.mean) / model.std
        for stage in trunk_stages(model)[:k]:
            h = stage(h)
    return h


@pytest.mark.parametrize("hflip", [0.0, 0.5])
def test_cached_views_are_the_trunk_outputs_of_the_image_and_of_its_mirror_image(tmp_path, hflip):
    phases = [Phase(1, "head", 1e-3), Phase(1, "last:1", 1e-3)]
    job = _job(tmp_path, phases, hflip=hflip)
    model = create_model(job.model)
    FoldModel(model).start_phase(job, 0, phases[0], N, Progress())
    cache = _cache(job, model)
    cache.for_phases(model, phases, 0)
    trunk, tr, va = cache.base, *job.rows()  # computed at the cut of the last:1 phase
    k = len(backbone_groups(model)) - 1
    assert trunk.k == k and len(trunk.views) == (2 if hflip else 1)
    torch.testing.assert_close(trunk.views[0].float(), _prefix(model, job.images.train[tr], k), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(trunk.val.float(), _prefix(model, job.images.train[va], k), rtol=2e-3, atol=2e-3)
    if hflip:
        mirrored = np.ascontiguousarray(job.images.train[tr][:, :, ::-1])
        torch.testing.assert_close(trunk.views[1].float(), _prefix(model, mirrored, k), rtol=2e-3, atol=2e-3)


def test_batches_give_each_image_one_of_its_views():
    views = torch.arange(3 * 10 * 2, dtype=torch.float16).view(3, 10, 2, 1, 1)
    trunk = CachedTrunk(1, views, views[0, :0])
    age = np.arange(10, dtype=np.float32)
    seen = []
    for h, a, _ in trunk.batches(age, np.zeros(10, np.float32), 5, seed=3):
        for x, i in zip(h, a.long()):
            seen.append(next(v for v in range(3) if torch.equal(x, views[v, i])))
    assert len(seen) == 10 and len(set(seen)) > 1


def test_the_trunk_store_is_computed_once_and_shared_by_the_folds(tmp_path, monkeypatch):
    phases = [Phase(1, "head", 1e-3), Phase(1, "last:2", 1e-3)]
    job = _job(tmp_path, phases, trunk_views=3)
    calls = []
    run = TrunkCache._run
    monkeypatch.setattr(TrunkCache, "_run", lambda self, rows, k, v: calls.append(len(rows)) or run(self, rows, k, v))
    trunks = []
    for fold in (0, 1):
        torch.manual_seed(0)  # the same starting weights, as a pretrained backbone has in every fold
        model = create_model(job.model)
        FoldModel(model).start_phase(job, 0, phases[0], N, Progress())
        cache = _cache(replace(job, fold=fold), model)
        cache.for_phases(model, phases, 0)
        trunks.append(cache.base)
    assert calls == [N, N, N]  # 3 views of every image, once
    k0, k_head = trunks[1].k, len(backbone_groups(model))
    stored = sorted(p.name for p in (tmp_path / "cache").glob("trunk-*.npy"))
    assert [n.split("-")[2:4] for n in stored] == [[f"k{k}", f"view{v}"] for k in (k0, k_head) for v in range(3)]
    tr1, _ = replace(job, fold=1).rows()
    (view0,) = (tmp_path / "cache").glob(f"trunk-*-k{k0}-view0-*.npy")
    assert torch.equal(trunks[1].views[0], torch.from_numpy(np.load(view0)[tr1]))
    assert not torch.equal(trunks[0].views[0][: len(tr1)], trunks[1].views[0])


def test_a_trunk_below_trained_stages_is_computed_for_the_fold_only(tmp_path):
    phases = [Phase(1, "all", 1e-2), Phase(1, "head", 1e-2)]
    job = _job(tmp_path, phases)
    model = create_model(job.model)
    cache = _cache(job, model)
    assert cache.for_phases(model, phases, 0) is None
    trunk = cache.for_phases(model, phases, 1)
    assert trunk is not None and not (tmp_path / "cache").exists()


def test_augmented_batches_do_not_depend_on_the_worker_count():
    images = np.random.default_rng(0).integers(0, 255, (40, 24, 24, 3), dtype=np.uint8)

    def batches(workers):
        ds = FaceDataset(images, np.arange(40), np.arange(40), np.zeros(40), train_transform(TrainConfig(), 3))
        return [x for x, _, _ in make_loader(ds, 8, train=True, seed=7, settings=LoaderSettings(workers=workers))]

    zero, two = batches(0), batches(2)
    assert len(zero) == 5 and all(torch.equal(a, b) for a, b in zip(zero, two))
    assert not torch.equal(zero[0], batches(0)[1])


def test_smooth_l1_beta_is_in_the_units_of_the_target():
    ages = np.array([10, 30, 50], np.float32)
    normalised, years = AgeScale.fit(ages, True), AgeScale.fit(ages, False)
    assert normalised.smooth_l1_beta == 0.25
    assert years.smooth_l1_beta == pytest.approx(0.25 * ages.std(), rel=1e-4) and years.std == 1.0


def test_head_and_last_n_phases_run_without_the_trunk_cache(tmp_path):
    job = _job(tmp_path, [Phase(1, "head", 1e-2), Phase(1, "last:1", 1e-2)], cache_frozen=False)
    train_mod.seed_everything(job.cfg.train.seed * 1000 + job.fold)  # as train_fold does before creating it
    start = create_model(job.model).state_dict()
    train_fold(job)
    best = torch.load(job.out / "best.pt", weights_only=True)["model"]
    assert torch.equal(best["backbone.stem.0.weight"], start["backbone.stem.0.weight"])
    assert len(_metrics(job)) == 2


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_a_killed_fold_resumes_mid_phase_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, capsys, amp):
    """Also in fp16 on CPU (autocast and the gradient scaler, as a T4 trains): the scaler's state survives."""
    phases = [Phase(1, "head", 1e-2), Phase(3, "all", 1e-2)]
    reference = replace(_job(tmp_path / "ref", phases, ema=0.9), amp=amp)
    train_fold(reference)
    job = replace(_job(tmp_path / "killed", phases, ema=0.9), amp=amp)
    save_epoch = train_mod.save_epoch

    def save_then_die(out, model, optim, phase, done, best_state):
        save_epoch(out, model, optim, phase, done, best_state)
        if done.epoch == 2:  # inside the uncached, augmented `all` phase
            scaler = torch.load(out / "last.pt", weights_only=True)["scaler"]
            assert (scaler is None) == (amp is None) and (amp is None or scaler["scale"] > 0)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_fold(job)
    monkeypatch.setattr(train_mod, "save_epoch", save_epoch)
    assert not (job.out / "train_done.json").exists()
    capsys.readouterr()
    train_fold(job)
    out = capsys.readouterr().out
    assert "resuming after epoch 2" in out and "epoch 3:" in out and "epoch 1:" not in out
    pd.testing.assert_frame_equal(_metrics(job), _metrics(reference))
    a = torch.load(job.out / "best.pt", weights_only=True)
    b = torch.load(reference.out / "best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    done = json.loads((job.out / "train_done.json").read_text())
    assert done["best_epoch"] == a["epoch"] and not (job.out / "last.pt").exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_the_gpu_recipe_code_path_runs_on_cpu(tmp_path, amp, monkeypatch):
    """configs/utkface_gpu.yaml's path, tiny: autocast in bf16 (an A100's) or fp16 with a gradient scaler (a T4's),
    channels_last, loader workers, EMA, its phases and models; only the device differs (FoldJob.amp turns on on CPU
    the autocast that CUDA would get)."""
    from conftest import REPO

    from pipeline.core.config import load_config
    from pipeline.inference.predict import predict_fold

    gpu = load_config(REPO / "configs" / "utkface_gpu.yaml")
    assert gpu.train.amp == "auto" and gpu.train.channels_last and gpu.train.ema > 0
    job = _job(tmp_path, [])
    recipe = gpu.models[1]  # its architecture and phases; random weights (the hub is not reached from tests)
    model = replace(recipe, pretrained=False, img_size=SIZE, phases=[replace(p, epochs=1) for p in gpu.phases(recipe)])
    cfg = replace(gpu, models=[model], train=replace(gpu.train, batch_size=8, num_workers=2), data=job.cfg.data)
    job = replace(job, cfg=cfg, model=model, amp=amp)
    dtypes = {"conv": set(), "heads": set()}  # the backbone's and the heads' output precision
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: (
            dtypes["conv" if isinstance(m, torch.nn.Conv2d) else "heads"].add(o.dtype)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
            else None
        )
    )
    scalers = []
    scaler_step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt: scalers.append(self) or scaler_step(self, opt))
    try:
        train_fold(job)
        predict_fold(job)
    finally:
        handle.remove()
    assert (torch.bfloat16 if amp == "bf16" else torch.float16) in dtypes["conv"]
    assert dtypes["heads"] == {torch.float32}  # the heads and the age expectation: fp32 under autocast too
    assert bool(scalers) == (amp == "fp16")  # fp16 steps go through the gradient scaler
    metrics = _metrics(job)
    assert metrics.train.tolist() == [p.train for p in model.phases] and np.isfinite(metrics.val_loss).all()
    oof = pd.read_csv(job.out / "oof.csv")
    assert len(oof) == N // 3 and np.isfinite(oof[["age", "gender_prob"]].to_numpy()).all()


def test_dldl_loss_is_lowest_for_a_distribution_centred_on_the_true_age():
    ages = torch.arange(121, dtype=torch.float32)
    centred_at = lambda c: (-0.5 * ((ages - c) / loss_fns.DLDL_SIGMA) ** 2)[None]  # noqa: E731
    years = torch.tensor([30.0])
    losses = [float(loss_fns.dldl_loss(centred_at(c), years, 10.0)) for c in (25.0, 30.0, 35.0)]
    assert losses[1] < 1e-4 < losses[0] and losses[1] < losses[2]


def _head_job(tmp_path, head: str = "dldl", **train) -> FoldJob:
    job = _job(tmp_path, [Phase(2, "all", 3e-3)], **train)
    model = replace(job.model, age_head=head)
    return replace(job, model=model, cfg=replace(job.cfg, models=[model]))


@pytest.mark.parametrize("head, outputs", [("dldl", DLDL_MAX_AGE + 1), ("meanvar", DLDL_MAX_AGE + 1), ("coral", 1)])
def test_a_distribution_or_ordinal_head_fold_trains_saves_its_head_and_predicts_ages_in_years(tmp_path, head, outputs):
    job = _head_job(tmp_path, head)
    train_fold(job)
    ckpt = torch.load(job.out / "best.pt", weights_only=True)
    assert (ckpt["age_head"], ckpt["age_mean"], ckpt["age_std"]) == (head, 0.0, 1.0)
    weight = ckpt["model"]["age_head.fc.weight" if head == "coral" else "age_head.weight"]
    assert weight.shape[0] == outputs
    predict_fold(job)
    oof = pd.read_csv(job.out / "oof.csv")
    assert oof.age.between(0, DLDL_MAX_AGE).all() and oof.age.std() > 0
    with pytest.raises(PipelineError, match=f"age_head={head}"):
        load_best(job.out / "best.pt", replace(job.model, age_head="regression"), job.device)


def test_coral_loss_is_lowest_at_the_true_age_and_its_age_is_the_expected_threshold_count():
    years = torch.tensor([30.0, 61.0])
    k = torch.arange(1, DLDL_MAX_AGE + 1, dtype=torch.float32)
    at = lambda c: 8.0 * (torch.tensor(c)[:, None] + 0.5 - k[None])  # noqa: E731  # sharp thresholds at the age
    losses = [float(loss_fns.coral_loss(at(c), years)) for c in ([30.0, 61.0], [25.0, 66.0], [35.0, 56.0])]
    assert losses[0] < 0.05 < min(losses[1:])
    undecided = loss_fns.coral_loss(torch.zeros(2, DLDL_MAX_AGE), years)  # every threshold at p = 0.5
    torch.testing.assert_close(undecided, torch.tensor(DLDL_MAX_AGE * np.log(2), dtype=torch.float32))
    backbone = torch.nn.Identity()
    backbone.num_features = 4
    net = AgeGenderNet(backbone, 0.0, "coral")
    torch.testing.assert_close(net.age_value(at([30.0, 61.0])), years, atol=1e-3, rtol=0)


def test_coral_head_starts_at_the_training_ages_prior():
    head = CoralHead(4, thresholds=5)
    head.start_at(np.array([1.0, 2.0, 2.0, 4.0]))  # P(age >= 1..5) = 1, 0.75, 0.25, 0.25, 0
    p = torch.sigmoid(head(torch.zeros(1, 4)))[0]
    torch.testing.assert_close(p, torch.tensor([1.0, 0.75, 0.25, 0.25, 0.0]), atol=1e-3, rtol=0)


def test_mean_variance_loss_is_its_three_terms_and_prefers_a_sharp_distribution_at_the_true_age():
    ages = torch.arange(DLDL_MAX_AGE + 1, dtype=torch.float32)
    years = torch.tensor([30.0, 61.0])

    def logits(centre, width):
        return -0.5 * ((ages[None] - torch.tensor(centre)[:, None]) / width) ** 2

    at, off, wide = logits([30.0, 61.0], 1.5), logits([35.0, 56.0], 1.5), logits([30.0, 61.0], 6.0)
    loss = loss_fns.mean_variance_loss
    assert loss(at, years) < loss(wide, years) < loss(off, years)
    p = torch.softmax(off, 1)
    mean = p @ ages
    variance = (p * (ages - mean[:, None]) ** 2).sum(1)
    ce = -torch.log(p[[0, 1], [30, 61]])
    expected = ce.mean() + 0.2 * 0.5 * ((mean - years) ** 2).mean() + 0.05 * variance.mean()
    torch.testing.assert_close(loss(off, years), expected)


@pytest.mark.parametrize("select, kept", [("best", 1), ("last", 3)])
def test_select_keeps_the_best_or_the_last_epoch(tmp_path, monkeypatch, select, kept):
    scores = iter([0.9, 0.8, 0.7])  # every epoch validates worse than the one before
    real = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda *a: {**real(*a), "score": next(scores)})
    job = _job(tmp_path, [Phase(3, "all", 3e-3)], select=select)
    train_fold(job)
    assert train_mod.checkpoint_epoch(job.out / "best.pt") == kept
    assert json.loads((job.out / "train_done.json").read_text())["best_epoch"] == kept


@pytest.mark.parametrize("phases, stored", [([Phase(1, "head", 3e-3), Phase(2, "last:1", 3e-3)], True), ([], False)])
def test_oof_rows_are_predicted_from_the_stored_trunk_while_its_weights_are_the_stored_ones(
    tmp_path, capsys, phases, stored
):
    """After head / last:N phases the frozen prefix still holds the weights whose outputs (of each training image
    and of its mirror image, the TTA views) are stored: the OOF rows run only the stages above the cut, with the
    image path's predictions. A phase that trained the prefix makes the store not apply: the images are run."""
    phases = phases or [Phase(1, "last:1", 3e-3), Phase(1, "all", 3e-3)]
    job = _job(tmp_path, phases)
    job = replace(job, cfg=replace(job.cfg, tta=["none", "hflip"]))
    train_fold(job)
    predict_fold(job)
    assert ("OOF rows from the stored outputs of the frozen trunk" in capsys.readouterr().out) == stored
    model, ckpt = load_best(job.out / "best.pt", job.model, job.device)
    _, va = job.rows()
    how = Inference.for_job(job, ["none", "hflip"])
    age, prob = predict_arrays(model, job.images.train, va, how, AgeUnits.of(ckpt))
    oof = pd.read_csv(job.out / "oof.csv")
    assert (oof.id == job.comp.train.id.to_numpy()[va]).all()
    np.testing.assert_allclose(oof.age, age, atol=0.05 if stored else 1e-4)  # the store holds float16
    np.testing.assert_allclose(oof.gender_prob, prob, atol=2e-3 if stored else 1e-6)
    test = pd.read_csv(job.out / "test.csv")  # test images are not in the store: always the image path
    t_age, t_prob = predict_arrays(model, job.images.test, np.arange(1), how, AgeUnits.of(ckpt))
    np.testing.assert_allclose(test.age, t_age, atol=1e-4)


def test_gender_smoothing_moves_the_training_targets_but_not_the_validation_loss():
    t = TrainConfig(gender_smoothing=0.1)
    scale = AgeScale(0.0, 1.0, 0.25)
    smooth, plain = Objective.of(t, scale), train_mod.Objective.of(TrainConfig(), scale)
    age, logit = torch.zeros(4), torch.tensor([2.0, -1.0, 0.5, 3.0])
    y_age, y_gender = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([0.95, 0.05, 0.05, 0.95]))
    torch.testing.assert_close(smooth(age, logit, y_age, y_gender), expected)
    assert plain(age, logit, y_age, y_gender) < expected  # confident and right: smoothing costs something
    val_smooth, val_plain = (LossSum(o, np.zeros(4, np.float32), y_gender.numpy()) for o in (smooth, plain))
    for val in (val_smooth, val_plain):
        val.take(None, age, logit)
    assert (
        val_smooth.value == pytest.approx(val_plain.value) == pytest.approx(float(plain(age, logit, y_age, y_gender)))
    )


@pytest.mark.parametrize("head", ["regression", "dldl", "meanvar", "coral"])
@pytest.mark.parametrize("what", ["all", "last:1"])
def test_val_loss_is_the_training_objective_on_the_validation_rows(tmp_path, head, what):
    """val_loss of an epoch equals the head's own loss (as trained, without augmentation or smoothing) of the saved
    model on the validation rows, whether the phase validates on images or on the cached trunk."""
    job = _head_job(tmp_path, head, gender_smoothing=0.1)
    model_cfg = replace(job.model, phases=[Phase(1, what, 3e-3)])
    job = replace(job, model=model_cfg, cfg=replace(job.cfg, models=[model_cfg]))
    train_fold(job)
    model, ckpt = load_best(job.out / "best.pt", job.model, job.device)
    tr, va = job.rows()
    ages = job.comp.train.age.to_numpy(np.float32)
    scale = AgeScale.fit(ages[tr], head == "regression")
    objective = Objective.of(job.cfg.train, scale, float(ages[tr].std() + 1e-6), head).unsmoothed
    x = torch.from_numpy(job.images.train[va]).permute(0, 3, 1, 2)
    with torch.no_grad(), evaluating(model):
        raw_age, logit = model(x, raw=True)
    y_age, y_gender = torch.from_numpy(scale.to_target(ages[va])), torch.tensor(job.comp.train.gender.to_numpy()[va])
    expected = float(objective(raw_age, logit, y_age, y_gender.float()))
    assert _metrics(job).val_loss.iloc[0] == pytest.approx(expected, rel=1e-4)


def test_a_backbone_that_does_not_split_says_so_once_and_trains_uncached(tmp_path, capsys):
    phases = [Phase(1, "head", 1e-2), Phase(1, "last:1", 1e-2)]
    job = _job(tmp_path, phases)
    model = replace(job.model, name="ghostnet_050")  # timm's GhostNet: no stage chain here
    job = replace(job, model=model, cfg=replace(job.cfg, models=[model]))
    train_mod.seed_everything(job.cfg.train.seed * 1000 + job.fold)
    start = create_model(job.model).state_dict()
    train_fold(job)
    out = capsys.readouterr().out
    assert out.count("GhostNet backbones do not split into stages") == 1 and "frozen trunk (" not in out
    best = torch.load(job.out / "best.pt", weights_only=True)["model"]
    assert torch.equal(best["backbone.conv_stem.weight"], start["backbone.conv_stem.weight"])  # frozen all along
    assert len(_metrics(job)) == 2 and not (tmp_path / "cache").exists()


def test_auto_amp_is_bf16_where_native_fp16_on_older_gpus_and_fp32_on_cpu(monkeypatch):
    from pipeline.training.job import amp_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("auto", cuda) == torch.float16  # a T4: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", cuda) == torch.bfloat16  # Ampere and later
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cuda) is None
    assert amp_dtype("fp16", cpu) == torch.float16 and amp_dtype("bf16", cpu) == torch.bfloat16


@pytest.mark.parametrize("head", ["regression", "dldl", "coral"])
def test_heads_and_the_age_expectation_run_in_fp32_under_autocast(head):
    model = AgeGenderNet(create_model(ModelConfig(name="scratch_cnn")).backbone, 0.0, head).eval()
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            age, logit = model(x)
            raw_age, _ = model(x, raw=True)
        assert age.dtype == logit.dtype == raw_age.dtype == torch.float32


def test_epoch_batches_keep_the_orders_the_shuffled_data_loader_gave():
    """One sampler for every epoch (its workers can stay up): still the orders of a fresh shuffled DataLoader per
    epoch seed, which earlier versions used, so a fixed seed trains the same folds."""
    from pipeline.training.loader import EpochBatches

    for n, bs, seed in [(37, 8, 5), (48, 8, 4200), (5, 8, 1)]:
        old = DataLoader(range(n), bs, shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=n > bs)
        sampler = EpochBatches(n, bs, True)
        sampler.set_epoch(seed)
        assert [[i for _, i in b] for b in sampler] == [b.tolist() for b in old]
        assert all(s == seed for b in sampler for s, _ in b)
    assert [len(b) for b in EpochBatches(37, 8, False)] == [8, 8, 8, 8, 5]


def test_a_fold_with_loader_workers_that_live_across_epochs_trains_as_one_without(tmp_path):
    phases = [Phase(1, "head", 3e-3), Phase(2, "all", 1e-3)]
    folds = {w: _job(tmp_path / f"w{w}", phases, num_workers=w) for w in (0, 2)}
    for job in folds.values():
        train_fold(job)
    pd.testing.assert_frame_equal(_metrics(folds[0]), _metrics(folds[2]))
    a, b = (torch.load(j.out / "best.pt", weights_only=True)["model"] for j in folds.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_trunk_outputs_go_to_the_gpu_when_they_fit_its_free_memory(monkeypatch):
    from pipeline.training.trunk import placement

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert placement(500, cuda, 0.5) == "gpu" and placement(501, cuda, 0.5) == "pinned"
    assert placement(1, cuda, 0.0) == "pinned" and placement(10**12, torch.device("cpu"), 1.0) == "host"


def test_batches_gathered_into_pinned_buffers_are_the_host_batches(monkeypatch):
    views = torch.randn(2, 20, 3, 2, 2).half()
    host = list(CachedTrunk(1, views, views[0, :0]).batches(np.arange(20.0), np.zeros(20), 6, seed=2))
    pinned = CachedTrunk(1, views, views[0, :0])
    pinned.where = "pinned"  # what placement() says on CUDA when they do not fit; no pinned memory on CPU
    asked, empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: asked.append(pin_memory) or empty(*a, **k))
    gathered = list(pinned.batches(np.arange(20.0), np.zeros(20), 6, seed=2))
    assert asked == [True] * 3 and len(gathered) == len(host) == 3
    assert all(torch.equal(x, y) and torch.equal(a, b) for (x, a, _), (y, b, _) in zip(host, gathered))


def test_the_trunk_store_runs_under_the_folds_autocast_with_loader_workers(tmp_path):
    from pipeline.training.trunk import stored_tta_inputs

    job = _job(tmp_path, [Phase(1, "last:1", 1e-3)])
    torch.manual_seed(0)
    model = create_model(job.model)
    set_trainable(model, Unfreeze.parse("last:1"))
    k = len(backbone_groups(model)) - 1
    tr, va = job.rows()
    outputs = {}
    for amp, workers in [(None, 0), (torch.bfloat16, 0), (torch.bfloat16, 2)]:
        t = replace(job.cfg.train, num_workers=workers)
        store = TrunkStore(tmp_path / f"s{workers}", job.images.train, t, amp)
        cache = TrunkCache(model, store, rows=(tr, va), device=job.device)
        outputs[amp, workers] = cache.for_phase(k, k).views
    assert torch.equal(outputs[torch.bfloat16, 0], outputs[torch.bfloat16, 2])
    assert not torch.equal(outputs[None, 0], outputs[torch.bfloat16, 0])  # computed in bf16, a store of its own
    torch.testing.assert_close(outputs[None, 0].float(), outputs[torch.bfloat16, 0].float(), atol=0.1, rtol=0.05)
    bf16, fp16 = (
        TrunkStore(tmp_path / "s0", job.images.train, job.cfg.train, a) for a in (torch.bfloat16, torch.float16)
    )
    tta = ["none", "hflip"]
    assert stored_tta_inputs(model, bf16, tta) is not None and stored_tta_inputs(model, fp16, tta) is None


def test_cuda_turns_on_tf32_and_cudnn_autotuning():
    from pipeline.training.job import pick_device

    matmul, conv, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn
    saved = matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark
    try:
        matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark = "ieee", "ieee", False
        assert pick_device(Config(train=TrainConfig(device="cpu"))).type == "cpu" and not cudnn.benchmark
        assert pick_device(Config(train=TrainConfig(device="cuda"))).type == "cuda"
        assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == ("tf32", "tf32", True)
    finally:
        matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark = saved


def test_train_compile_without_a_compiler_is_refused_in_one_line(monkeypatch):
    from pipeline.training.job import check_compile

    check_compile(Config(train=TrainConfig(compile=False)))
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(PipelineError, match="needs a C.. compiler .* set train.compile: false"):
        check_compile(Config(train=TrainConfig(compile=True)))


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile (inductor) needs g++; .ci/run installs it")
def test_a_compiled_fold_trains_and_saves_the_plain_models_weights(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain, compiled = (_job(tmp_path / name, [Phase(1, "all", 1e-3)], compile=c) for name, c in [("a", 0), ("b", 1)])
    train_fold(plain)
    train_fold(compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # the training step went through torch.compile
    a, b = (torch.load(j.out / "best.pt", weights_only=True)["model"] for j in (plain, compiled))
    assert a.keys() == b.keys()  # no _orig_mod. prefix: resume, predict and export read it as ever
    m_a, m_b = _metrics(plain), _metrics(compiled)
    assert m_a.train_loss.iloc[0] == pytest.approx(m_b.train_loss.iloc[0], rel=0.05)  # inductor: its own dropout RNG
    predict_fold(compiled)
    assert len(pd.read_csv(compiled.out / "oof.csv")) == N // 3
