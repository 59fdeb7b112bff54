"""The Prefect flow: the declared stages (kd_core/stages) expanded for the config, one task per stage and key,
each waiting for the tasks that write what it reads; independent tasks run in parallel up to
`orchestration.max_parallel_students`. What a node does (ask DVC whether its stage is up to date, run it or skip
it, record it in DVC) and the run's bookkeeping (the run folder's lock, the MLflow parent run, `dvc push` at the
end) are `kd_core.pipeline.execute`'s; this module wires them to Prefect.

A stage that does not apply to a key (`Stage.applies`: a student without post-distillation fine-tuning or
without a teacher cache) is no task: the flow runs it inline, in its turn. Every stage prints a start and an end
line (`kd_core.pipeline.console`), also written to the Prefect run log; the flow run is named after the run folder
and the time (`default-2026-11-29-1305`), and leaves two artifacts: `kd-config` (the resolved configuration) and
`kd-comparison` (the report, its plots inlined, a link to the MLflow pipeline run).

Run ad hoc with `kd run` (Prefect's temporary local server), serve on a schedule with `kd serve --cron` or
deploy to a work pool with `prefect deploy` (prefect.yaml).
"""

from __future__ import annotations

import kd_core  # noqa: F401  (offline defaults first)

import base64
import json
import re
import time
from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from kd_core.pipeline.cluster.dispatch import check_cluster
from kd_core.config import load_config
from kd_core.errors import is_retryable
from kd_core.pipeline import console
from kd_core.pipeline.dag import producers
from kd_core.pipeline.execute import PipelineRun, run_task

console.quiet_reported_errors()  # bad input: its one line, not Prefect's traceback of it


def _retry_transient(task, task_run, state) -> bool:
    """Retry what may pass by itself (a server, I/O); bad input and diverged losses fail the same way again."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 (the rule is kd_core.errors.is_retryable)
        return is_retryable(err)
    return False


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient)
def stage_task(stage: str, node: str, params_path: str, overrides: dict | None = None, key: str | None = None,
               dvc_root: str | None = None, verdict: str = "ask"):
    """One stage for one key as a Prefect task (`execute.run_task`); it ends as `Skipped` when DVC finds the stage
    up to date."""
    result = run_task(stage, node, params_path, overrides, key, dvc_root, verdict, get_run_logger())
    if isinstance(result, dict) and result.get("skipped"):
        return Completed(name="Skipped", message="up to date (DVC)", data=result)
    return result


def _flow_run_name() -> str:
    """`<run folder>-<date>-<HHMM>`, e.g. `default-2026-11-29-1305` (the folder from the run's params)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    try:
        folder = Path(load_config(params.get("params_path", "params.yaml"), params.get("overrides")).run_dir).name
    except Exception:  # noqa: BLE001 (a bad config fails the flow itself, with its message)
        folder = "kd"
    return f"{folder}-{datetime.now():%Y-%m-%d-%H%M}"


@flow(name="kd-pipeline", log_prints=True, flow_run_name=_flow_run_name)
def kd_pipeline(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    from prefect.runtime import flow_run

    from kd_core.training.interrupts import on_sigterm

    on_sigterm(chain=True)  # SIGTERM (a cancel): the training stage in a task thread checkpoints and stops
    cfg = load_config(params_path, overrides)
    console.quiet_mlflow_registry()
    log = get_run_logger()
    check_cluster(cfg)  # execution.engine ray: the cluster answers and can hold each stage's workers
    _config_artifact(cfg, params_path, overrides)
    with PipelineRun.start(cfg, params_path, overrides, f"flow run {flow_run.name}", log) as run:
        summary = run.finish(_run_nodes(run), f"{flow_run.name} ({flow_run.id})")
    create_markdown_artifact(markdown=comparison_markdown(Path(summary["compare"]["markdown"]), summary["mlflow_run"]),
                             key="kd-comparison", description="registered models compared")
    return summary | {"flow_run": {"id": str(flow_run.id), "name": flow_run.name}}


def _run_nodes(run: PipelineRun) -> dict[str, dict]:
    """Every node as a task, each waiting for the tasks that write what it reads; a node whose stage does not
    apply runs inline, in its turn (`_wait_turn`); their results by node name. DVC is asked once, up front, for
    every stage (`PipelineRun.verdicts`); only a node downstream of one that ran asks again in its turn."""
    cfg = run.cfg
    workers = cfg.orchestration.max_parallel_students
    futures: dict[str, object] = {}
    inline: dict[str, dict] = {}
    verdicts = run.verdicts()
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        for node in run.nodes:  # in dependency order: every producer is submitted (or run inline) before its readers
            waits = [futures[p.name] for p in producers(node, run.nodes) if p.name in futures]
            if not node.stage.works_for(cfg, node.key):
                _wait_turn(waits, list(futures.values()), workers)
                inline[node.name] = run.run_inline(node, verdicts[node.name])
                continue
            run_name = f"{node.stage.name}-{node.key}" if node.key else node.stage.name  # e.g. distill-fkl
            configured = stage_task.with_options(name=node.stage.name, task_run_name=run_name,
                                                 retries=cfg.orchestration.retries)
            futures[node.name] = runner.submit(configured, run.task_args(node, verdicts[node.name]), wait_for=waits)
        done = {name: future.result() for name, future in futures.items()}
    return {n.name: done[n.name] if n.name in done else inline[n.name] for n in run.nodes}


def _wait_turn(waits: list, earlier: list, workers: int) -> None:
    """Wait until an inline node may run: its producers are done, and a worker would be free for it as a task
    (fewer than `workers` of the tasks submitted before it still running; with one worker: all of them), so
    the nodes run in the order they would as tasks (with the default one worker, the graph's order). When a
    task did not complete, raise the run's first failure (the root cause, not a `NotReady` reader of it)."""
    try:
        for future in waits:
            future.result()
        while sum(not f.wrapped_future.done() for f in earlier) >= workers:
            time.sleep(0.2)
    except BaseException:
        for future in earlier:
            if future.state.is_failed() or future.state.is_crashed():
                future.result()
        raise


# ----------------------------------------------------------------------------------------------- artifacts
def _config_artifact(cfg, params_path: str, overrides: dict | None) -> None:
    """The resolved configuration (the params file, the overrides and every default) as the flow run's
    `kd-config` artifact: the flow's parameters stay what a rerun takes (`params_path`, `overrides`)."""
    import yaml

    sets = " ".join(f"-S {k}={json.dumps(v)}" for k, v in (overrides or {}).items())
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120)
    overridden = f", overrides `{sets}`" if sets else ", no overrides"
    create_markdown_artifact(
        key="kd-config", description="the resolved configuration: params file + overrides, every default filled in",
        markdown=f"# Resolved configuration\n\nParams file `{params_path}`{overridden}; run folder `{cfg.run_dir}`; "
                 f"config fingerprint `{cfg.fingerprint()}`.\n\n```yaml\n{text}```\n")


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def comparison_markdown(report: Path, mlflow_page: dict) -> str:
    """The comparison report for the Prefect artifact: its PNG plots inlined as data URIs (the artifact has no
    folder for relative paths to point into) and, under the title, where the MLflow pipeline run is."""
    def inline(match: re.Match) -> str:
        target = match.group(2)
        path = report.parent / target
        if re.match(r"^[a-z]+:", target) or not path.is_file() or path.suffix.lower() != ".png":
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"

    text = _IMAGE.sub(inline, report.read_text(encoding="utf-8"))
    where = "MLflow pipeline run (params, report, plots, the stage runs nested under it): "
    url = mlflow_page["url"]
    where += f"start the UI with `{mlflow_page['command']}`, then open {url}" if mlflow_page["command"] else f"[{url}]({url})"
    title, sep, rest = text.partition("\n")
    return f"{title}\n\n{where}\n{sep}{rest}" if title.startswith("#") else f"{where}\n\n{text}"
