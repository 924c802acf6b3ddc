"""The Kaggle round trip with the real `kaggle` client against a stand-in for Kaggle's API on loopback: the
download of data.competition, submit (file, message, ledger row), submissions (scores read back, correlation,
plot), and every error a user meets as one line with nothing changed. No socket leaves loopback (ss and an audit
hook in every CLI process say so)."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, cli_command, cli_env, write_config
from kaggle_standin import Competition, KaggleStandIn, folder_files

SLUG = "age-gender-demo"
NETLOG_SITE = Path(__file__).parent / "netlog"  # sitecustomize.py: logs every socket connect of a CLI process


def public_score(data: bytes) -> tuple[str, str]:
    """A made-up leaderboard score that depends on the file (mean predicted age), as Kaggle's strings."""
    lines = data.decode().splitlines()[1:]
    ages = [float(line.split(",")[1]) for line in lines]
    return f"{sum(ages) / len(ages) / 10:.5f}", f"{sum(ages) / len(ages) / 11:.5f}"


def loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return ipaddress.ip_address(host.split("%")[0]).is_loopback


def tcp_connections(pid: int) -> set[tuple[str, str]]:
    """(local, remote) of the TCP connections ss shows for process `pid`, and of those no process holds any more
    (TIME-WAIT: a closed connection stays listed for a minute), so that short ones are seen too."""
    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return {
        (row[3], row[4])
        for row in rows
        if len(row) > 4 and row[0] != "LISTEN" and (f"pid={pid}," in " ".join(row[5:]) or len(row) == 5)
    }


class Cli:
    """`python -m pipeline` against the stand-in, in `cwd`; ss watches the process's sockets while it runs."""

    def __init__(self, standin: KaggleStandIn, cwd: Path, home: Path):
        self.standin, self.cwd, self.home = standin, cwd, home
        self.netlog = cwd / "connects.log"

    def __call__(self, *args, credentials: str = "key", env: dict | None = None) -> subprocess.CompletedProcess:
        full = cli_env({**self.standin.env(self.home, credentials), **(env or {})})
        full["PYTHONPATH"] = f"{NETLOG_SITE}:{REPO}"
        full["NETLOG"] = str(self.netlog)
        before = tcp_connections(-1)
        proc = subprocess.Popen(cli_command(*args), cwd=self.cwd, env=full, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        seen: set[tuple[str, str]] = set()
        watch = threading.Thread(target=self._watch, args=(proc, seen))
        watch.start()
        out, err = proc.communicate(timeout=600)
        watch.join()
        seen |= tcp_connections(proc.pid)
        self.peers = {remote for local, remote in seen - before}
        outside = {p for p in self.peers if not loopback(p)}
        assert not outside, f"sockets outside loopback: {outside}"
        logged = self.netlog.read_text().split() if self.netlog.is_file() else []
        assert all(loopback(a) for a in logged), logged
        assert "Traceback" not in err, out + err
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    @staticmethod
    def _watch(proc: subprocess.Popen, seen: set[tuple[str, str]]) -> None:
        while proc.poll() is None:
            seen |= tcp_connections(proc.pid)
            time.sleep(0.02)


REAL_HOME_KAGGLE = [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]


@pytest.fixture(scope="module")
def kaggle(demo_root, tmp_path_factory):
    """A stand-in Kaggle that holds the demo competition, and a blended run of it (data.competition set)."""
    real_home_before = [p.exists() for p in REAL_HOME_KAGGLE]
    root = tmp_path_factory.mktemp("kaggle")
    home = root / "home"
    home.mkdir()
    with KaggleStandIn() as standin:
        standin.competitions[SLUG] = Competition(files=folder_files(demo_root), score=public_score)
        run = Cli(standin, root, home)
        data = {"root": str(root / "data" / SLUG), "competition": SLUG, "img_size": 32}
        cfg = write_config(root / "cfg.yaml", data=data)
        r = run("run", cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        yield standin, run, cfg, root
    assert [p.exists() for p in REAL_HOME_KAGGLE] == real_home_before  # the client never wrote into the real home


def blended_submission(root: Path) -> Path:
    """The submission file the fixture's blend wrote (relative to root)."""
    return Path(json.loads((root / "runs" / "exp" / "blend.json").read_text())["submission"])


def ledger(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "submissions" / "ledger.csv", dtype=str, keep_default_na=False)


def test_download_fills_data_root_once_and_keeps_home_clean(kaggle, demo_root):
    standin, run, cfg, root = kaggle
    got = root / "data" / SLUG
    assert folder_files(got) == folder_files(demo_root)
    assert len(standin.calls("DownloadDataFiles")) == 1  # the run downloaded once: later stages found the folder
    r = run("folds", cfg)
    assert r.returncode == 0 and len(standin.calls("DownloadDataFiles")) == 1
    assert (run.home / ".kaggle").is_dir()  # the client made its config folder in the test's home, not the user's
    assert standin.peers == {"127.0.0.1"} and not standin.connects


def test_submit_sends_the_file_with_cv_digest_commit_and_logs_it(kaggle):
    standin, run, cfg, root = kaggle
    blend = json.loads((root / "runs" / "exp" / "blend.json").read_text())
    newest = Path(blend["submission"])
    n_sent, n_rows = len(standin.submissions), len(ledger(root)) if (root / "submissions/ledger.csv").is_file() else 0
    r = run("submit", cfg, "--message", "first try")
    assert r.returncode == 0, r.stdout + r.stderr
    assert run.netlog.read_text() and run.peers  # the audit hook and ss both saw this process's connections
    sent = standin.submissions[-1]
    assert sent["data"] == (root / newest).read_bytes() and sent["fileName"] == newest.name
    text = sent["description"]
    assert text.startswith(f"exp | CV {blend['metric']} {blend['cv']:.4f} | config ") and text.endswith("first try")
    digest = re.search(r"config ([0-9a-f]{12})", text).group(1)
    row = ledger(root).iloc[-1]
    assert row.ref == str(sent["ref"]) and row.status == "pending" and row.config_digest == digest
    assert row.competition == SLUG and float(row.cv) == pytest.approx(blend["cv"], abs=1e-6)
    assert row.file == str(newest) and re.fullmatch(r"[0-9a-f]{40}(\+modified)?|unknown", row.commit)

    again = run("submit", cfg)  # the same file: refused, with when and how it scored
    assert again.returncode == 2 and "already submitted" in again.stderr and row.ref in again.stderr
    assert len(standin.submissions) == n_sent + 1 and len(ledger(root)) == n_rows + 1


def test_submissions_reads_scores_back_and_plots_cv_against_public(kaggle):
    standin, run, cfg, root = kaggle
    if not standin.submissions:
        assert run("submit", cfg).returncode == 0
    standin.competitions[SLUG].polls_to_score = 0
    sub = blended_submission(root)
    before = (root / "submissions" / "ledger.csv").read_bytes()
    for i, shift in enumerate((0.5, 1.5)):  # two more files (ages shifted), each scored while --wait polls
        other = root / "submissions" / f"shifted{i}.csv"
        df = pd.read_csv(root / sub, dtype={"id": str})
        df["age"] += shift
        df.to_csv(other, index=False)
        r = run("submit", cfg, "--file", other, "--wait")
        assert r.returncode == 0 and "public score" in r.stdout, r.stdout + r.stderr
    # a submission Kaggle got but the ledger missed (a submit cut off after the upload) is found by its message
    lost = dict(standin.submissions[-1], ref=59999, fileName="lost.csv", polls_left=0)
    standin.submissions.append(lost)
    standin.submissions.append(dict(lost, ref=59998, description="made by hand"))  # not ours: left out
    r = run("submissions", cfg)
    standin.submissions.pop()
    assert r.returncode == 0, r.stdout + r.stderr
    log = ledger(root)
    assert (root / "submissions" / "ledger.csv").read_bytes().startswith(before)  # appended, never rewritten
    state = log.drop_duplicates("ref", keep="last")
    assert len(state) == 4 and (state.status == "complete").all() and "59998" not in set(state.ref)
    adopted = state[state.ref == "59999"].iloc[0]
    assert adopted.file == "lost.csv" and adopted.experiment == "exp" and adopted.config_digest
    for s in standin.submissions:
        mine = state[state.ref == str(s["ref"])].iloc[0]
        assert (mine.public_score, mine.private_score) == public_score(s["data"])
    assert "CV-public correlation over 4 scored submissions: Pearson" in r.stdout
    assert (root / "runs" / "exp" / "plots" / "leaderboard.png").stat().st_size > 1000
    assert "CV against the leaderboard" in (root / "runs" / "exp" / "report.html").read_text()


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no credentials", "KAGGLE_API_TOKEN"),
        ("wrong key", "did not accept the credentials"),
        ("rules", "rules are not accepted"),
        ("daily limit", "daily submission limit"),
        ("no network", "cannot reach Kaggle"),
        ("unknown slug", "no such competition"),
    ],
)
def test_a_failed_submit_says_why_in_one_line_and_changes_nothing(kaggle, case, expect):
    standin, run, cfg, root = kaggle
    comp = standin.competitions[SLUG]
    sub = blended_submission(root)
    other = root / "submissions" / f"untried-{case.replace(' ', '-')}.csv"
    df = pd.read_csv(root / sub, dtype={"id": str})
    df["age"] += 3.25
    df.to_csv(other, index=False)
    files = {p: p.read_bytes() for p in (root / "submissions").iterdir()}
    args, credentials, env = ["submit", cfg, "--file", other], "key", {}
    if case == "no credentials":
        credentials = "none"
    elif case == "wrong key":
        env = {"KAGGLE_KEY": "wrong"}
    elif case == "rules":
        comp.rules_accepted = False
    elif case == "daily limit":
        comp.daily_left = 0
    elif case == "no network":
        dead = "http://127.0.0.1:9"  # discard port: nobody listens
        env = {"HTTP_PROXY": dead, "http_proxy": dead, "HTTPS_PROXY": dead, "https_proxy": dead}
    elif case == "unknown slug":
        args.append("data.competition=no-such-competition")
    try:
        r = run(*args, credentials=credentials, env=env)
    finally:
        comp.rules_accepted, comp.daily_left = True, 5
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert {p: p.read_bytes() for p in (root / "submissions").iterdir()} == files  # no ledger row, no file changed


def test_download_errors_leave_no_half_folder(kaggle, tmp_path):
    standin, run, cfg, root = kaggle
    standin.competitions["closed"] = Competition(files={"train.csv": b"id,age,gender\n"}, rules_accepted=False)
    for slug, expect in (("closed", "rules are not accepted"), ("nope", "no such competition")):
        target = tmp_path / slug
        r = run("folds", cfg, f"data.competition={slug}", f"data.root={target}", f"experiment={slug}")
        assert r.returncode == 2 and expect in r.stderr, r.stdout + r.stderr
        assert not target.exists() and not [p for p in tmp_path.glob(".*") if p.suffix != ".lock"]


def test_refuses_a_file_that_fails_validation(kaggle):
    standin, run, cfg, root = kaggle
    bad = root / "submissions" / "bad.csv"
    sub = blended_submission(root)
    pd.read_csv(root / sub, dtype={"id": str}).iloc[:-1].to_csv(bad, index=False)  # a row short
    n = len(standin.submissions)
    r = run("submit", cfg, "--file", bad)
    assert r.returncode == 2 and "failed validation" in r.stderr and len(standin.submissions) == n
    shutil.os.remove(bad)


def test_the_offline_predictor_finds_the_competition_under_kaggle_input(tmp_path):
    from pipeline.serving.kaggle_predict import default_competition_dir

    (tmp_path / "other-dataset").mkdir()
    (tmp_path / "comp" / "x").mkdir(parents=True)
    (tmp_path / "comp" / "x" / "sample_submission.csv").write_text("id,age,gender\n")
    assert default_competition_dir("", "sample_submission.csv", tmp_path) == tmp_path / "comp" / "x"
    assert default_competition_dir("other-dataset", "sample_submission.csv", tmp_path) == tmp_path / "other-dataset"
    assert default_competition_dir("", "sample_submission.csv", tmp_path / "none") == Path(".")


def test_an_empty_or_foreign_ledger_is_one_line_not_a_traceback(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.orchestration.submit import read_ledger

    empty = tmp_path / "ledger.csv"
    empty.write_text("")
    assert read_ledger(empty).empty
    empty.write_text("a,b\n1,2\n")
    with pytest.raises(PipelineError, match="not a submissions ledger"):
        read_ledger(empty)
