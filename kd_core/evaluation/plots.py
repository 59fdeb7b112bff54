"""The comparison report's figures (kd_core/evaluation/compare.py): size versus quality over the registered versions,
and the teacher-uncertainty buckets of the students (OKD Figures 2 and 5). matplotlib's Agg canvas, no pyplot and no
global backend; each PNG is written atomically. Imports neither torch nor transformers: the compare stage runs
without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path`` (parent folders created; a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path


def size_quality_plot(rows: list[dict], key: str, path: str | Path) -> Path:
    """Metric ``key`` (with its 95% CI as error bars when the metrics have ``*_ci_low`` / ``*_ci_high``) against the
    parameter count (log scale), one point per registered version in ``rows`` (kd_core/evaluation/compare.py
    `collect_rows`: ``tags``, ``metrics``, ``version``); the teacher as a square."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    for r in rows:
        if key not in r["metrics"] or not r["tags"].get("kd.parameters"):
            continue
        x, y = int(r["tags"]["kd.parameters"]), r["metrics"][key]
        lo, hi = r["metrics"].get(key.replace("_mean", "_ci_low")), r["metrics"].get(key.replace("_mean", "_ci_high"))
        marker = "s" if r["tags"].get("kd.role") == "teacher" else "o"
        yerr = [[y - lo], [hi - y]] if lo is not None and hi is not None else None
        ax.errorbar([x], [y], yerr=yerr, fmt=marker, capsize=3)
        ax.annotate(f"{r['tags'].get('kd.model')} v{r['version']}", (x, y), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(key)
    ax.set_title("size vs quality (registered versions, 95% CI: bootstrap over prompts)")
    return _save(fig, path)


def _bucket_labels(n: int) -> list[str]:
    if n == 3:
        return ["easy", "medium", "hard"]
    if n == 2:
        return ["easy", "hard"]
    return [f"Q{i + 1}" for i in range(n)]


def plot_unc_buckets(buckets_by_model: Mapping[str, list[dict[str, float]]], path: str | Path) -> Path:
    """Three panels (student logit STD, KL(p||q), top-1 agreement) against UNC bucket, one line per model.

    Writes a PNG to ``path`` (parent folders created, atomically) and returns it as a ``Path``.
    """
    if not buckets_by_model:
        raise ValueError("plot_unc_buckets: no models given")
    fig = _figure((13, 3.8))
    axes = fig.subplots(1, 3)
    panels = [("logit_std", "STD of student logits"), ("kl", "KL(p || q)"), ("top1_agreement", "Top-1 agreement")]
    n_max = max(len(b) for b in buckets_by_model.values())
    for ax, (key, title) in zip(axes, panels):
        for name, buckets in buckets_by_model.items():
            xs = list(range(len(buckets)))
            ax.plot(xs, [b[key] for b in buckets], marker="o", label=name)
        ax.set_title(title)
        ax.set_xticks(list(range(n_max)))
        ax.set_xticklabels(_bucket_labels(n_max))
        ax.set_xlabel("teacher UNC bucket")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, path)
