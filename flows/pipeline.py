"""The Prefect flow: the declared stages (kd_core/stages) expanded for the config, one task per stage and key,
each waiting for the tasks that write what it reads; independent tasks run in parallel up to
`orchestration.max_parallel_students`. Each task asks DVC whether its stage is up to date (then it ends as
`Skipped`), else runs the stage function and records the stage in DVC (`kd_core.lineage`); the run ends with a
`dvc push` when a remote is configured.

Run ad hoc with `kd run` (a temporary local Prefect server), serve on a schedule with `kd serve --cron` or
deploy to a work pool with `prefect deploy` (prefect.yaml).
"""

from __future__ import annotations

import kd_core  # noqa: F401  (offline defaults first)

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from kd_core import tracking
from kd_core.config import load_config
from kd_core.errors import is_retryable
from kd_core.lineage import DvcBook
from kd_core.run import RunPaths
from kd_core.stages import run_stage
from kd_core.stages.compare import saved_report
from kd_core.stages.graph import expand, producers


def _retry_transient(task, task_run, state) -> bool:
    """Retry what may pass by itself (a server, I/O); bad input and diverged losses fail the same way again."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 (the rule is kd_core.errors.is_retryable)
        return is_retryable(err)
    return False


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient)
def stage_task(stage: str, node: str, params_path: str, overrides: dict | None = None, key: str | None = None,
               dvc_root: str | None = None):
    """One stage for one key: skipped when DVC finds it up to date, else run and recorded in DVC."""
    dvc = DvcBook(Path(dvc_root)) if dvc_root else DvcBook.off("")
    if dvc.enabled and not dvc.changes(node):
        get_run_logger().info("%s: up to date in DVC, skipped", node)
        return Completed(name="Skipped", message="up to date (DVC)", data={"skipped": True, "stage": node})
    result = run_stage(stage, load_config(params_path, overrides), key)
    dvc.record(node)
    return result


@flow(name="kd-pipeline", log_prints=True)
def kd_pipeline(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = load_config(params_path, overrides)
    dvc = DvcBook.for_run(params_path, overrides)
    if not dvc.enabled:
        get_run_logger().info("DVC bookkeeping off: %s; every stage runs", dvc.reason)
    nodes = expand(cfg)
    futures: dict[str, object] = {}
    with ThreadPoolTaskRunner(max_workers=cfg.orchestration.max_parallel_students) as runner:
        for node in nodes:  # in dependency order: every producer is submitted before its readers
            run_name = f"{node.stage.name}-{node.key}" if node.key else node.stage.name  # e.g. distill-fkl
            configured = stage_task.with_options(name=node.stage.name, task_run_name=run_name,
                                                 retries=cfg.orchestration.retries)
            waits = [futures[p.name] for p in producers(node, nodes)]
            args = {"stage": node.stage.name, "node": node.name, "params_path": params_path, "overrides": overrides,
                    "key": node.key, "dvc_root": str(dvc.root) if dvc.enabled else None}
            futures[node.name] = runner.submit(configured, args, wait_for=waits)
        results = {name: future.result() for name, future in futures.items()}
    paths = RunPaths.of(cfg)
    skipped = [name for name, r in results.items() if isinstance(r, dict) and r.get("skipped")]
    registered = results["register"] if "register" not in skipped else json.loads(paths.registry.read_text())
    report = results["compare"] if "compare" not in skipped else saved_report(paths)
    with open(report["markdown"], encoding="utf-8") as fh:
        create_markdown_artifact(markdown=fh.read(), key="kd-comparison", description="registered models compared")
    pushed = dvc.push()
    if pushed:
        get_run_logger().info(pushed)
    return {"run_dir": cfg.run_dir, "registered": registered, "compare": report, "skipped": skipped,
            "dvc": pushed or dvc.reason or "recorded", "tracking_uri": tracking.tracking_uri(cfg)}
