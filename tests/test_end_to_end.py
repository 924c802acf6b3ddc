import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
experiment: {experiment}
data: {{root: {root}, img_size: 32}}
folds: {{n_splits: 2, seed: 3}}
models:
  - name: scratch_cnn
    pretrained: false
    phases: [{{epochs: 2, train: all, lr: 0.003}}]
  - name: tf_efficientnet_lite0
    phases: [{{epochs: 1, train: head, lr: 0.003}}, {{epochs: 1, train: "last:2", lr: 0.002}}]
train: {{batch_size: 16}}
tta: [none, hflip]
"""


def cli(*args, cwd):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"},
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_end_to_end_run_resume_and_stages(demo_root, workdir):
    cfg = workdir / "tiny.yaml"
    cfg.write_text(CONFIG.format(experiment="tiny", root=demo_root))
    r = cli("run", str(cfg), cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CV score:" in r.stdout and "blend" in r.stdout
    subs = sorted((workdir / "submissions").glob("tiny-*.csv"))
    assert len(subs) == 1
    sub = pd.read_csv(subs[0], dtype={"id": str})
    sample = pd.read_csv(demo_root / "sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns) and sub.id.tolist() == sample.id.tolist()
    assert sub.gender.isin([0, 1]).all() and sub.age.between(0, 120).all()
    for model in ("scratch_cnn", "tf_efficientnet_lite0"):
        for k in (0, 1):
            d = workdir / "runs" / "tiny" / model / f"fold{k}"
            assert (d / "best.pt").is_file() and (d / "oof.csv").is_file() and (d / "test.csv").is_file()
            assert len(pd.read_csv(d / "metrics.csv")) == (2 if model == "scratch_cnn" else 2)
    oof = pd.read_csv(workdir / "runs" / "tiny" / "oof_blend.csv")
    assert len(oof) == 90  # every training image predicted exactly once, out of fold
    assert (workdir / "runs" / "tiny" / "config.yaml").is_file()

    # the same command again: nothing retrained, a new submission, the earlier one untouched
    before = subs[0].read_bytes()
    r2 = cli("run", str(cfg), cwd=workdir)
    assert r2.returncode == 0 and "already trained, skipping" in r2.stdout
    subs2 = sorted((workdir / "submissions").glob("tiny-*.csv"))
    assert len(subs2) == 2 and subs[0].read_bytes() == before and subs2[1].read_bytes() == before

    # a changed config under the same experiment name is refused
    r3 = cli("run", str(cfg), "models.0.phases.0.epochs=3", cwd=workdir)
    assert r3.returncode == 2 and "different config" in r3.stderr

    # stage by stage, one model and fold at a time, under another name: the same submission
    staged = workdir / "staged.yaml"
    staged.write_text(CONFIG.format(experiment="staged", root=demo_root))
    assert cli("folds", str(staged), cwd=workdir).returncode == 0
    early = cli("blend", str(staged), cwd=workdir)
    assert early.returncode == 2 and "no predictions yet" in early.stderr
    for k in ("0", "1"):
        assert cli("train", str(staged), "model=scratch_cnn", f"fold={k}", cwd=workdir).returncode == 0
    assert cli("train", str(staged), "model=tf_efficientnet_lite0", cwd=workdir).returncode == 0
    assert cli("predict", str(staged), cwd=workdir).returncode == 0
    r4 = cli("blend", str(staged), cwd=workdir)
    assert r4.returncode == 0, r4.stderr
    staged_sub = sorted((workdir / "submissions").glob("staged-*.csv"))[0]
    assert staged_sub.read_bytes() == before
