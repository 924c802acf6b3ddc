"""Kaggle submissions: `submit` sends an experiment's submission with its CV in the message, `submissions` reads the
scores back. Both keep submissions/ledger.csv, an append-only log (one row per event: a submission accepted, its
status or scores changed; the latest row of a ref is its state). A failed submit writes nothing."""

from __future__ import annotations

import hashlib
import re
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from ..core.config import Config
from ..core.errors import PipelineError
from ..core.files import exclusive, write_bytes
from ..core.kaggle_api import KaggleError, call, kaggle_api
from ..core.layout import BLEND, LEDGER, SUBMISSIONS, BlendFile, experiment_dir
from ..core.provenance import config_digest, git_commit
from ..data.competition import load_competition
from ..data.test_set import validate_submission
from ..inference.blend import newest_submission
from ..inference.report import leaderboard_plot, write_report
from ..models.backbones import pretraining

COLUMNS = [
    "time", "competition", "ref", "status", "public_score", "private_score", "experiment", "metric", "cv",
    "config_digest", "commit", "file", "sha256", "message",
]  # fmt: skip
POLL_SECONDS = 10.0
WAIT_LIMIT = 3600.0  # --wait gives up after an hour (the ledger row stays pending; `submissions` updates it later)


def read_ledger(path: Path = LEDGER) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS, dtype=str)
    try:
        ledger = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not a readable CSV ({e}); it is append-only, restore it from a copy") from None
    missing = [c for c in COLUMNS if c not in ledger.columns]
    if missing:
        raise PipelineError(f"{path}: not a submissions ledger (no column {missing[0]!r}); move it away")
    return ledger


def latest(ledger: pd.DataFrame) -> pd.DataFrame:
    """Each submission's current state: the last row of every ref, in the order they were submitted."""
    if ledger.empty:
        return ledger
    first = ledger.drop_duplicates("ref", keep="first").ref.tolist()
    return ledger.drop_duplicates("ref", keep="last").set_index("ref").loc[first].reset_index()[COLUMNS]


def append_rows(rows: list[dict], path: Path = LEDGER) -> None:
    """Append rows to the ledger atomically: the old bytes stay as they were, the file is replaced in one rename."""
    # blocking: a submission Kaggle accepted must reach the ledger even while another process appends
    with exclusive(path.with_name(f".{path.name}.lock"), f"an update of {path}", wait=True):
        old = path.read_bytes() if path.is_file() else b""
        text = pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False, header=not old)
        write_bytes(old + text.encode(), path)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_file(cfg: Config, path: Path) -> None:
    """The submission validation the blend stage applies: every test id once, in order, finite ages, 0/1 genders."""
    comp = load_competition(cfg)
    if len(comp.test) == 0:
        raise PipelineError(f"{cfg.data.root}: no test set, so nothing to submit")
    try:
        sub = pd.read_csv(path, dtype={comp.sub_id_col: str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not a readable CSV ({e})") from None
    cols = (comp.sub_id_col, comp.sub_age_col, comp.sub_gender_col)
    missing = [c for c in cols if c not in sub.columns]
    if missing:
        raise PipelineError(f"{path}: no column {missing[0]!r} (the competition's columns are {', '.join(cols)})")
    try:
        t = comp.test_set()
        validate_submission(sub, t.submission_ids, *cols)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{path}: submission failed validation: {e}") from None
    except PipelineError as e:
        raise PipelineError(f"{path}: {e}") from None


def _score(value) -> str:
    return "" if value in (None, "") else str(value)


def _status(s) -> str:
    return s.status.name.lower() if getattr(s, "status", None) is not None else ""


def submit(cfg: Config, file: str = "", message: str = "", wait: bool = False, poll: float = POLL_SECONDS) -> dict:
    """Submit `file` (default: the experiment's newest submission) to data.competition; returns its ledger row."""
    slug = cfg.data.competition
    if not slug:
        raise PipelineError("data.competition: name the Kaggle competition (its slug) to submit to")
    summary = BlendFile.read(experiment_dir(cfg.experiment))  # one line when the experiment is not blended
    # the file whose CV blend.json holds; a blend stopped between the two leaves the newest file unclaimed
    latest_file = Path(summary.submission) if summary.submission else None
    path = Path(file) if file else latest_file or newest_submission(SUBMISSIONS, cfg.experiment)
    if path is None or not path.is_file():
        raise PipelineError(f"{file or SUBMISSIONS}: no submission file of experiment {cfg.experiment} found")
    _check_file(cfg, path)
    sha = _digest(path)
    done = latest(read_ledger())
    done = done[(done.sha256 == sha) & (done.competition == slug) & (done.status != "error")]
    if len(done):
        row = done.iloc[-1]
        score = f"public score {row.public_score}" if row.public_score else f"status {row.status}, not scored yet"
        raise PipelineError(
            f"{path}: this file was already submitted to {slug} on {row.time} (ref {row.ref}, {score}); "
            "`python -m pipeline submissions CONFIG` shows every score"
        )
    exp_dir = experiment_dir(cfg.experiment)
    metric, cv = summary.metric, summary.cv
    digest, commit = config_digest(exp_dir), git_commit()
    text = f"{cfg.experiment} | CV {metric} {cv:.4f} | config {digest} | commit {commit[:12]}"
    if message:
        text += f" | {message}"
    api = kaggle_api()
    with deferred_interrupt():  # once Kaggle has the submission, Ctrl-C waits until the ledger has it too
        response = call(
            f"submission to {slug}",
            lambda: api.competition_submit(str(path), text, slug, quiet=True),
            if_cut="Kaggle may have received it: `python -m pipeline submissions CONFIG` finds it and logs it",
        )
        if not getattr(response, "ref", 0):
            raise KaggleError(f"submission to {slug}: the upload did not complete ({response.message}); run it again")
        row = _accepted(cfg, slug, response.ref, metric, cv, digest, commit, str(path), sha, text)
    print(f"submitted {path} to {slug} (ref {response.ref}): {text}")
    if wait:
        row = _wait(api, row, poll)
    return row


@contextmanager
def deferred_interrupt():
    """Ctrl-C inside the block is held back and raised when the block ends."""
    caught = []
    old = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def _accepted(cfg, slug, ref, metric, cv, digest, commit, file, sha, text) -> dict:
    """The ledger row of a submission Kaggle accepted (appended before anything else can go wrong)."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "competition": slug,
        "ref": str(ref),
        "status": "pending",
        "public_score": "",
        "private_score": "",
        "experiment": cfg.experiment,
        "metric": metric,
        "cv": f"{cv:.6f}",
        "config_digest": digest,
        "commit": commit,
        "file": file,
        "sha256": sha,
        "message": text,
    }
    try:
        append_rows([row])
    except OSError as e:
        raise PipelineError(
            f"Kaggle accepted the submission (ref {ref}) but {LEDGER} could not be written ({e}); "
            "`python -m pipeline submissions CONFIG` logs it once the folder is writable"
        ) from None
    return row


def _wait(api, row: dict, poll: float) -> dict:
    end = time.monotonic() + WAIT_LIMIT
    print(f"waiting for Kaggle to score ref {row['ref']} ...", flush=True)
    while time.monotonic() < end:
        updated = refresh(api, row["competition"], latest(read_ledger()))
        mine = [r for r in updated if r["ref"] == row["ref"]]
        if mine and mine[-1]["status"] != "pending":
            r = mine[-1]
            print(f"ref {r['ref']}: {r['status']}, public score {r['public_score'] or '-'}")
            return r
        time.sleep(poll)
    print(f"ref {row['ref']} is still pending; `python -m pipeline submissions CONFIG` reads its score later")
    return row


def refresh(api, slug: str, current: pd.DataFrame) -> list[dict]:
    """Append a ledger row for every submission of ours whose status or scores Kaggle now shows differently."""
    listed = call(f"list of submissions to {slug}", lambda: api.competition_submissions(slug, page_size=100)) or []
    remote = {str(s.ref): s for s in listed if s is not None}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    known = set(current.ref)
    rows = [_adopted(s, slug, now) for ref, s in remote.items() if ref not in known and _ours(s)]
    for _, r in current[current.competition == slug].iterrows():
        s = remote.get(r.ref)
        if s is None:
            continue
        new = {"status": _status(s), "public_score": _score(s.public_score), "private_score": _score(s.private_score)}
        if any(r[k] != v for k, v in new.items()):
            rows.append({**r.to_dict(), **new, "time": now})
    if rows:
        append_rows(rows)
    return rows


MESSAGE = re.compile(r"^(\S+) \| CV (\S+) ([-\d.]+) \| config ([0-9a-f]*) \| commit (\S*)")  # submit's message


def _ours(s) -> bool:
    return bool(MESSAGE.match(getattr(s, "description", None) or ""))


def _adopted(s, slug: str, now: str) -> dict:
    """A ledger row for a submission of ours that Kaggle lists but the ledger misses (a submit cut off after Kaggle
    got it), rebuilt from its message; its file's digest is unknown."""
    experiment, metric, cv, digest, commit = MESSAGE.match(s.description).groups()
    return {
        "time": now,
        "competition": slug,
        "ref": str(s.ref),
        "status": _status(s),
        "public_score": _score(s.public_score),
        "private_score": _score(s.private_score),
        "experiment": experiment,
        "metric": metric,
        "cv": cv,
        "config_digest": digest,
        "commit": commit,
        "file": s.file_name or "",
        "sha256": "",
        "message": s.description,
    }


def submissions(cfg: Config) -> pd.DataFrame:
    """Refresh the scores of data.competition's submissions from Kaggle, print them with the CV-public
    correlation and write the CV-against-leaderboard plot into the experiment's report."""
    slug = cfg.data.competition
    if not slug:
        raise PipelineError("data.competition: name the Kaggle competition (its slug) whose submissions to show")
    refresh(kaggle_api(), slug, latest(read_ledger()))
    table = latest(read_ledger())
    table = table[table.competition == slug]
    if table.empty:
        print(f"no submissions to {slug} in {LEDGER} yet: python -m pipeline submit CONFIG")
        return table
    print(table[["time", "ref", "experiment", "cv", "public_score", "private_score", "status"]].to_string(index=False))
    print(correlation_line(table))
    exp_dir = experiment_dir(cfg.experiment)
    if (exp_dir / BLEND).is_file():
        plot = leaderboard_plot(exp_dir, table)
        weights = [pretraining(m) for m in cfg.models]
        report = write_report(
            exp_dir, [m.name for m in cfg.models], cfg.folds.n_splits, cfg.metric, cfg.folds.age_bins, weights
        )
        print(f"CV against the leaderboard: {plot}, also in {report}")
    return table


def correlation_line(table: pd.DataFrame) -> str:
    scored = table.assign(
        cv=pd.to_numeric(table.cv, errors="coerce"), public=pd.to_numeric(table.public_score, errors="coerce")
    ).dropna(subset=["cv", "public"])
    if len(scored) < 3:
        return f"CV-public correlation: needs 3 scored submissions ({len(scored)} so far)"
    pearson = scored.cv.corr(scored.public)
    spearman = scored.cv.corr(scored.public, method="spearman")
    return (
        f"CV-public correlation over {len(scored)} scored submissions: Pearson {pearson:.3f}, Spearman {spearman:.3f}"
    )
