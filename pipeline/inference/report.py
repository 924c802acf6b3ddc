"""runs/<experiment>/report.html: one self-contained page with the plots and tables of a finished blend."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from ..core.files import write_bytes, write_text  # noqa: E402
from ..core.layout import (  # noqa: E402
    DATA_REPORT,
    EPOCH_METRICS,
    LEADERBOARD_PLOT,
    OOF_BLEND,
    REPORT,
    BlendFile,
    fold_dir,
)
from ..core.metrics import METRICS, evaluate  # noqa: E402
from .calibrate import age_bin  # noqa: E402

UTK_RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
COLS = ("n", *METRICS)


def _race(g) -> str:
    """A group's name: UTKFace's group is race, coded 0-4 in the file name (keys may be text, as in blend.json)."""
    s = str(g).removesuffix(".0")
    return UTK_RACES.get(int(s), s) if s.isdigit() else s


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _save(fig, folder: Path, name: str) -> str:
    """Write the PNG beside the report and return it base64-encoded for embedding."""
    data = _png(fig)
    write_bytes(base64.b64decode(data), folder / f"{name}.png")
    return data


def _cell(v, floats: str) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if np.isnan(v) else floats.format(v)
    return html.escape(str(v))


def _table(df: pd.DataFrame, floats: str = "{:.4f}") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [df.index.name or "", *df.columns])
    rows = [
        f"<tr><th>{html.escape(str(r[0]))}</th>{''.join(f'<td>{_cell(v, floats)}</td>' for v in r[1:])}</tr>"
        for r in df.itertuples()
    ]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def group_table(oof: pd.DataFrame, key: pd.Series, threshold: float) -> pd.DataFrame:
    rows = {}
    for name, part in oof.groupby(key, observed=True):
        if len(part) == 0:
            continue
        m = evaluate(part.age_true, part.age_blend, part.gender_true, part.prob_blend, threshold)
        if part.gender_true.nunique() < 2:  # macro-F1 (and so the score) means nothing within one gender
            m.update(f1=float("nan"), score=float("nan"))
        rows[name] = {"n": len(part), **m}
    out = pd.DataFrame.from_dict(rows, orient="index")[list(COLS)]
    out.index.name = key.name
    return out


def learning_curves(exp_dir: Path, models: list[str], n_splits: int):
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for k in range(n_splits):
            path = fold_dir(exp_dir, model, k) / EPOCH_METRICS
            if path.is_file():
                m = pd.read_csv(path)
                ax.plot(m.epoch, m.val_score, marker="o", ms=3, label=f"fold {k}")
        ax.set(title=model, xlabel="epoch", ylabel="validation score")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def pred_vs_true(oof: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    hb = ax.hexbin(oof.age_true, oof.age_blend, gridsize=40, mincnt=1, bins="log", cmap="viridis")
    top = max(oof.age_true.max(), oof.age_blend.max())
    ax.plot([0, top], [0, top], "r--", lw=1)
    ax.set(xlabel="true age", ylabel="predicted age (blend, OOF)", title="OOF predicted vs true age")
    fig.colorbar(hb, ax=ax, label="images (log)")
    return fig


def mae_by_age(oof: pd.DataFrame, models: list[str], age_bins: list[float]):
    bins = age_bin(oof.age_true, age_bins)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [*models, "blend"]
    width = 0.8 / len(names)
    labels = list(bins.cat.categories)
    for i, name in enumerate(names):
        col = "age_blend" if name == "blend" else f"age:{name}"
        mae = (oof[col] - oof.age_true).abs().groupby(bins, observed=False).mean()
        ax.bar(np.arange(len(labels)) + i * width, mae.to_numpy(), width, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=0, fontsize=8)
    ax.set(xlabel="true age", ylabel="MAE (years)", title="OOF MAE by age bin")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def gender_confusion(oof: pd.DataFrame, threshold: float):
    cm = confusion_matrix(oof.gender_true, (oof.prob_blend >= threshold).astype(int), labels=[0, 1])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            f"{v}\n{v / max(1, cm[i].sum()):.1%}",
            ha="center",
            va="center",
            color="white" if v > cm.max() / 2 else "black",
        )
    ax.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="true", title="gender (blend, OOF)")
    return fig


def blend_weights(summary: BlendFile):
    names = list(summary.age_weights)
    fig, ax = plt.subplots(figsize=(5, 2.8))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [summary.age_weights[n] for n in names], 0.4, label="age")
    ax.bar(x + 0.2, [summary.gender_weights[n] for n in names], 0.4, label="gender")
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylim=(0, 1), ylabel="weight", title="blend weights (chosen on OOF)")
    ax.legend(fontsize=7)
    return fig


def leaderboard_plot(exp_dir: Path, table: pd.DataFrame) -> Path:
    """plots/leaderboard.png: each scored Kaggle submission's CV against its public (and private) score; the
    report shows it from then on. `table`: the ledger's latest rows (orchestration/submit.py)."""
    cv = pd.to_numeric(table.cv, errors="coerce")
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for col, marker, label in (("public_score", "o", "public"), ("private_score", "x", "private")):
        score = pd.to_numeric(table[col], errors="coerce")
        ok = cv.notna() & score.notna()
        if ok.any():
            ax.scatter(cv[ok], score[ok], marker=marker, label=label)
            for x, y, ref, exp in zip(cv[ok], score[ok], table.ref[ok], table.experiment[ok]):
                ax.annotate(f"{exp} ({ref})", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    metric = table.metric.iloc[-1] if len(table) else "CV"
    ax.set(xlabel=f"CV {metric} (cross-fitted)", ylabel="Kaggle score", title="CV against the leaderboard")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    folder = exp_dir / "plots"
    folder.mkdir(exist_ok=True)
    _save(fig, folder, LEADERBOARD_PLOT.removesuffix(".png"))
    return folder / LEADERBOARD_PLOT


def reliability_plot(cal: dict):
    """The gender probability's reliability diagram, before and after the rescaling; OOF solid, held out dashed."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    for split, style in (("oof", "-"), ("holdout", "--")):
        for when, color in (("before", "C0"), ("after", "C1")):
            if cal.get(split):
                pts = np.asarray(cal[split]["gender"][f"reliability_{when}"], float).reshape(-1, 3)
                label = f"{when} ({'OOF' if split == 'oof' else 'held out'})"
                ax.plot(pts[:, 0], pts[:, 1], style, color=color, marker="o", ms=3, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean probability of gender 1", ylabel="frequency of gender 1")
    ax.set(title="gender reliability")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _splits(cal: dict) -> list[tuple[str, dict]]:
    return [("OOF", cal["oof"])] + ([("held out", cal["holdout"])] if cal.get("holdout") else [])


def _rows(index: list[str], name: str, columns: list[str], values: list[list]) -> pd.DataFrame:
    """A table of ints and floats as given (object dtype: row counts stay ints); None shows as a dash."""
    values = [[float("nan") if v is None else v for v in row] for row in values]
    return pd.DataFrame(values, index=pd.Index(index, name=name), columns=columns, dtype=object)


def _calibration_html(cal: dict, img: str) -> str:
    """The "Calibrated answers" section: the age intervals' coverage and width, the "at least N?" answer, and the
    gender probability before and after its rescaling."""
    g, splits = cal["gender"], _splits(cal)
    method = g["method"]
    if method in ("temperature", "platt"):
        method += f" (a={g.get('a', 1):.3f}, b={g.get('b', 0):.3f})"
    elif method == "isotonic":
        method += f" ({len(g.get('x') or [])} steps)"
    tried = ", ".join(f"{k} {v:.4f}" for k, v in cal["chosen_by"].items())
    flat = [
        {
            "all": f,
            **{f"age {k}": v for k, v in f["by_age"].items()},
            **f["by_gender"],
            **{_race(k): v for k, v in (f.get("by_group") or {}).items()},
        }
        for _, f in splits
    ]
    keys = list(dict.fromkeys(k for fl in flat for k in fl))
    stats = (("rows", "rows"), ("coverage", "coverage"), ("width", "width (years)"))
    coverage = _rows(
        keys,
        "true age / gender / group",
        [f"{name} {label}" for name, _ in splits for _, label in stats],
        [[fl.get(k, {}).get(s) for fl in flat for s, _ in stats] for k in keys],
    )
    t = cal["oof"]["min_age"]["threshold"]
    answers = ("yes_among_under", "no_among_over", "unsure", "under", "over")
    min_age = _rows(
        [f"yes among under {t:g} (the costly error)", f"no among {t:g} or over", "unsure (all rows)",
         f"rows under {t:g}", f"rows {t:g} or over"],
        f"at least {t:g}?",
        [name for name, _ in splits],
        [[f["min_age"][a] for _, f in splits] for a in answers],
    )  # fmt: skip
    gender = _rows(
        [name for name, _ in splits],
        "gender probability",
        ["ECE before", "ECE after", "log-loss before", "log-loss after"],
        [[f["gender"][k] for k in ("ece_before", "ece_after", "log_loss_before", "log_loss_after")] for _, f in splits],
    )
    bins = len(cal["age"]["edges"])
    held = " Held out: the test split, scored with what was fitted on the OOF rows only." if len(splits) > 1 else ""
    return (
        f"<h2>Calibrated answers</h2><p>Age intervals at level {cal['level']:g}: split-conformal, Mondrian bins by "
        f"predicted age ({bins} bin{'s' * (bins != 1)}), fitted on the cross-fitted OOF blend; in the OOF figures "
        f"each fold's rows are scored with what the other folds fitted.{held} Gender rescaling: "
        f"{html.escape(method)}; cross-fitted OOF log-loss of each tried: {html.escape(tried)}.</p>"
        + _table(coverage, "{:.3f}")
        + f"<h3>At least {t:g}?</h3><p>Yes when the whole interval is at or above {t:g}, no when it is all below, "
        "unsure otherwise.</p>"
        + _table(min_age, "{:.3f}")
        + "<h3>Gender probability</h3><p>Before: the models' blended probability (the submission's); after: the "
        "calibrated one people are shown.</p>" + _table(gender) + f"<img src='data:image/png;base64,{img}'>"
    )


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}table{border-collapse:collapse;margin:.6em 0 1.4em}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}th{background:#f4f4f4}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#f6f8fa;border-radius:8px;padding:.8em 1.2em}
.card b{display:block;font-size:1.6em}img{max-width:100%;margin:.4em 0}.grid{display:flex;flex-wrap:wrap;gap:1em}
img.thumb{width:72px;margin:0 2px 0 0}"""


def _groups_html(g: dict) -> str:
    """folds.groups=near_duplicates: what was found, with a few example pairs as thumbnails."""

    def thumb(path: str) -> str:
        try:
            img = Image.open(path).convert("RGB")
        except OSError:
            return "(file gone)"
        img.thumbnail((72, 72))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return f"<img class=thumb src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"

    pairs = "".join(
        "<div>"
        + "".join(thumb(p) for p in e["paths"])
        + f"<br><small>{html.escape(' = '.join(e['ids']))}</small></div>"
        for e in g["examples"]
    )
    noise = g.get("label_noise") or []
    return (
        f"<h3>Near-duplicate groups (folds.groups)</h3><p>{g['groups']} groups of near-duplicate images "
        f"({g['images_in_groups']} images, the largest {g['largest']}), each kept on one side of every fold and of "
        f"the hold-out split. {len(noise)} pictures had copies labelled otherwise (label noise) and were skipped.</p>"
        f"<div class=grid>{pairs}</div>"
    )


def _face_crop_html(fc: dict) -> str:
    """data.face_crop=detect: how many images had no face (kept whole), and the first 50 of them."""
    out = (
        f"<p>Face crop (data.face_crop=detect): no face found in {fc['train_no_face']} of {fc['train_images']} "
        f"training images and {fc['test_no_face']} of {fc['test_images']} test images; those were kept whole.</p>"
    )
    files = fc["no_face_files"]
    if files:
        items = "".join(f"<li><code>{html.escape(f['file'])}</code> ({f['split']})</li>" for f in files[:50])
        first = " (the first 50)" if len(files) > 50 else ""
        out += f"<details><summary>images without a face{first}</summary><ul>{items}</ul></details>"
    return out


def write_report(
    exp_dir: Path, models: list[str], n_splits: int, metric: str, age_bins: list[float], weights: list[str] = ()
) -> Path:
    """age_bins: the lower edges of the age bins (folds.age_bins); the last bin is open-ended. weights: what each
    model's starting weights were pretrained on, and their licence (models.backbones.pretraining)."""
    summary = BlendFile.read(exp_dir)
    oof = pd.read_csv(exp_dir / OOF_BLEND, dtype={"id": str}, keep_default_na=False)
    threshold = summary.threshold
    data = json.loads((exp_dir / DATA_REPORT).read_text()) if (exp_dir / DATA_REPORT).is_file() else {}
    plots = exp_dir / "plots"
    plots.mkdir(exist_ok=True)
    img = {
        "curves": _save(learning_curves(exp_dir, models, n_splits), plots, "learning_curves"),
        "scatter": _save(pred_vs_true(oof), plots, "pred_vs_true"),
        "mae_age": _save(mae_by_age(oof, models, age_bins), plots, "mae_by_age"),
        "confusion": _save(gender_confusion(oof, threshold), plots, "gender_confusion"),
        "weights": _save(blend_weights(summary), plots, "blend_weights"),
    }
    table = pd.DataFrame(summary.table).T[["threshold", *METRICS]]
    table.index.name = "model"
    table_half = pd.DataFrame(summary.table_at_half).T[list(METRICS)]
    table_half.index.name = "model"
    groups = []
    if "group" in oof.columns and oof.group.notna().any():
        key = oof.group.map(_race).rename("race (from file name)")
        groups.append(("By race", group_table(oof, key, threshold)))
    groups.append(("By age bin", group_table(oof, age_bin(oof.age_true, age_bins), threshold)))
    groups.append(("By gender", group_table(oof, oof.gender_true.rename("gender"), threshold)))

    blend = summary.blend_scores
    cards = [
        ("CV " + metric + " (cross-fitted)", blend[metric]),
        ("in-sample " + metric, summary.table["blend"][metric]),
        ("MAE", blend["mae"]),
        ("RMSE", blend["rmse"]),
        ("gender accuracy", blend["accuracy"]),
        ("macro-F1", blend["f1"]),
    ]
    held = summary.holdout
    parts = [
        f"<h1>{html.escape(exp_dir.name)}</h1>",
        f"<p class=sub>{summary.oof_rows} out-of-fold images, {n_splits} folds, models: "
        f"{', '.join(map(html.escape, models))}. Blend weights and gender threshold ({threshold:.2f}) were chosen "
        "on OOF predictions only.</p>",
        "<div class=cards>" + "".join(f"<div class=card>{k}<b>{v:.4f}</b></div>" for k, v in cards) + "</div>",
        "<p>Cross-fitted: each fold's rows blended with the weights and threshold fitted on the other folds' rows "
        "only (the headline CV, and the cards after it). In-sample: the blend fitted on all rows, which the "
        "submission uses, scored on those same rows; the difference is what fitting the blend adds to the CV.</p>",
        "<h2>OOF results</h2>",
        f"<p>Ages clipped as in the submission; each row's gender threshold chosen on OOF (the blend's, "
        f"{threshold:.2f}, is the submission's).</p>",
        _table(table),
        "<p>The same at gender threshold 0.5:</p>",
        _table(table_half),
    ]
    if held:
        parts += [
            "<h2>Held-out test set</h2><p>Labels read only after the submission was written.</p>",
            _table(pd.DataFrame({"held-out": held}).T),
        ]
    if summary.submission:
        parts.append(f"<p>Submission: <code>{html.escape(summary.submission)}</code></p>")
    if weights:
        parts += [
            "<h2>Starting weights</h2><p>What each backbone was pretrained on, and the weights' licence: check them "
            "against the competition's rules (many allow ImageNet-pretrained weights only).</p><ul>",
            *(f"<li>{html.escape(w)}</li>" for w in weights),
            "</ul>",
        ]
    parts += [
        "<h2>Learning curves</h2>",
        f"<img src='data:image/png;base64,{img['curves']}'>",
        "<h2>Age</h2><div class=grid>",
        f"<img src='data:image/png;base64,{img['scatter']}'><img src='data:image/png;base64,{img['mae_age']}'></div>",
        "<h2>Gender and blend</h2><div class=grid>",
        f"<img src='data:image/png;base64,{img['confusion']}'><img src='data:image/png;base64,{img['weights']}'>",
        "</div><h2>Errors by group (blend, OOF)</h2>",
    ]
    for title, df in groups:
        parts += [f"<h3>{title}</h3>", _table(df)]
    if summary.calibration:  # None in blend.json of earlier versions
        parts.append(
            _calibration_html(summary.calibration, _save(reliability_plot(summary.calibration), plots, "reliability"))
        )
    if (plots / LEADERBOARD_PLOT).is_file():  # written by `python -m pipeline submissions`
        data_lb = base64.b64encode((plots / LEADERBOARD_PLOT).read_bytes()).decode()
        parts += [
            "<h2>CV against the leaderboard</h2><p>Every scored Kaggle submission in submissions/ledger.csv.</p>",
            f"<img src='data:image/png;base64,{data_lb}'>",
        ]
    if data:
        parts += [
            "<h2>Data</h2>",
            f"<p>{data['train_images']} training images used, {data['test_images']} test "
            f"images, {data['skipped']} skipped.</p>",
        ]
        if data.get("face_crop"):
            parts.append(_face_crop_html(data["face_crop"]))
        if data.get("groups"):
            parts.append(_groups_html(data["groups"]))
        if data["skipped_by_reason"]:
            reasons = pd.DataFrame({"files": data["skipped_by_reason"]})
            reasons.index.name = "reason skipped"
            parts.append(_table(reasons))
            listed = data["skipped_files"][:50]
            parts.append(
                "<details><summary>skipped files</summary><ul>"
                + "".join(f"<li><code>{html.escape(s['file'])}</code>: {html.escape(s['reason'])}</li>" for s in listed)
                + "</ul></details>"
            )
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(exp_dir.name)} report</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = exp_dir / REPORT
    write_text(page, path)
    return path
