"""Weights & Biases: online when logged in, offline otherwise (never waits on a network), or off."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from .config import Config


def wandb_mode(cfg: Config) -> str:
    if not cfg.tracking.wandb:
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Tracker:
    """One W&B run; every method is a no-op when tracking is off."""

    def __init__(self, cfg: Config, name: str, job_type: str, run_dir: Path, enabled: bool = True):
        """enabled=False: an idle tracker, for a job with nothing left to log."""
        self.run = None
        mode = wandb_mode(cfg) if enabled else "disabled"
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=cfg.tracking.project,
                group=cfg.experiment,
                name=name,
                job_type=job_type,
                config=cfg.to_dict(),
                dir=str(run_dir),
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60, console="off"),
            )
        except Exception as e:  # tracking must never cost the user a run
            print(f"W&B: could not start a run ({type(e).__name__}: {e}); continuing without tracking")

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def table(self, key: str, rows: dict[str, dict]) -> None:
        """Log {row name: {column: value}} as a W&B table."""
        if self.run is not None:
            import wandb

            cols = list(next(iter(rows.values())))
            self.run.log({key: wandb.Table(columns=["name", *cols], data=[[n, *r.values()] for n, r in rows.items()])})

    def artifact(self, name: str, kind: str, files: list[Path]) -> None:
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind)
            for f in files:
                art.add_file(str(f))
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
