"""Stage `evaluate`: generation metrics on every eval set (greedy and sampled over seeds), validation loss, and
for students the teacher-forced agreement with the teacher (`metrics/<model>.json`, every metric: what the register
stage logs and tests read), plus `metrics/<model>.summary.json`, the few numbers `dvc metrics show` prints (a
line per model that fits a terminal)."""

from __future__ import annotations

from kd_core.config import PipelineConfig
from kd_core.io import write_json_atomic
from kd_core.run import RunPaths, require
from kd_core.tracking import runs

# (key in the summary, metric key, decimals)
SAMPLED = ("rougeL", "rougeL_sampled_mean", 2)  # per configured eval set
GREEDY = ("greedy", "rougeL_greedy", 2)  # on the champion metric's eval set
RUN_SUMMARY = (("val_ppl", "val/ppl", 3), ("top1", "test/top1_agreement", 3))  # not tied to an eval set


def summary(cfg: PipelineConfig, metrics: dict) -> dict:
    """The DVC metrics of one model, nested as {set: {key: value}} (`dvc metrics show` prints `test.rougeL`):
    ROUGE-L sampled (mean over seeds) per configured eval set, greedy ROUGE-L on the champion metric's set, the
    validation perplexity, the top-1 agreement with the teacher (students), and the champion metric under its own
    name when it is none of these; rounded for reading. Greedy ROUGE-L on the other sets stays in <model>.json and
    the report: with it, the default config's three sets make `dvc metrics show` ~165 characters wide."""
    champion = cfg.tracking.champion.metric
    champion_set = champion.split("/", 1)[0]
    out: dict = {}
    for set_name in cfg.evaluation.eval_sets:
        for short, key, digits in (SAMPLED, GREEDY) if set_name == champion_set else (SAMPLED,):
            if f"{set_name}/{key}" in metrics:
                out.setdefault(set_name, {})[short] = round(metrics[f"{set_name}/{key}"], digits)
    out |= {short: round(metrics[key], digits) for short, key, digits in RUN_SUMMARY if key in metrics}
    covered = {f"{s}/{SAMPLED[1]}" for s in cfg.evaluation.eval_sets} | {f"{champion_set}/{GREEDY[1]}"} | \
        {key for _, key, _ in RUN_SUMMARY}
    if champion not in covered and champion in metrics:
        set_name, _, key = champion.rpartition("/")
        (out.setdefault(set_name, {}) if set_name else out)[key] = round(metrics[champion], 4)
    return out


def summary_path(paths: RunPaths, model_name: str):
    return paths.metrics(model_name).with_name(f"{model_name}.summary.json")


def evaluate(cfg: PipelineConfig, paths: RunPaths, model_name: str) -> dict:
    """Generation metrics on every eval set (greedy and sampled over seeds), validation loss, agreement."""
    from kd_core.evaluation.run import evaluate_model

    model_dir = require(paths.model(model_name), f"model for {model_name!r}", "training stages of that model")
    with runs.stage_run(cfg, paths.root, "evaluate", model_name):
        metrics = evaluate_model(cfg, paths, model_name, model_dir)
        runs.log_metrics(metrics)
    write_json_atomic(paths.metrics(model_name), metrics)
    write_json_atomic(summary_path(paths, model_name), summary(cfg, metrics))
    return metrics
