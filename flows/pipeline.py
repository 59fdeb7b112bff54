"""The Prefect flow: the declared stages (kd_core/stages) expanded for the config, one task per stage and key,
each waiting for the tasks that write what it reads; independent tasks run in parallel up to
`orchestration.max_parallel_students`. Each task asks DVC whether its stage is up to date (then it ends as
`Skipped`), else runs the stage function and records the stage in DVC (`kd_core.lineage`: a `dvc commit` on a
background thread, while the next stage runs; `register` and the end of the run wait for the commits); the run
ends with a `dvc push` when a remote is configured.

A stage that does not apply to a key (`Stage.applies`: a student without post-distillation fine-tuning or
without a teacher cache) is no task: the flow runs it inline (it writes its outputs: a hard link, a manifest),
asking and recording DVC the same way. Every stage prints a start and an end line (`kd_core.console`), also
written to the Prefect run log; the flow run is named after the run folder and the time (`default-2026-11-29-1305`),
and leaves two artifacts: `kd-config` (the resolved configuration) and `kd-comparison` (the report, its plots
inlined, a link to the MLflow pipeline run).

Run ad hoc with `kd run` (a temporary local Prefect server), serve on a schedule with `kd serve --cron` or
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

from kd_core import console, tracking
from kd_core.config import load_config
from kd_core.errors import is_retryable
from kd_core.cluster.dispatch import check_cluster, run_training_job, training_on_ray
from kd_core.launcher import launched_result, launcher_for, run_as_process, run_launched
from kd_core.lineage import DvcBook, git_revision, settle_commits, untracked_inputs
from kd_core.run import RunPaths, run_lock
from kd_core.stages import run_stage
from kd_core.stages.compare import saved_report
from kd_core.stages.graph import Node, expand, producers


console.quiet_reported_errors()  # bad input: its one line, not Prefect's traceback of it

# the stages that may run alongside others (every stage between `train_teacher` and `register`, `train_teacher`
# alongside a transfer set's or another teacher's): with `orchestration.max_parallel_students` > 1 each runs as a
# `kd stage` process of its own (`kd_core.launcher.run_as_process`)
SIDE_BY_SIDE = {"train_teacher", "transfer", "cache_teacher", "distill", "finetune", "evaluate"}


def _retry_transient(task, task_run, state) -> bool:
    """Retry what may pass by itself (a server, I/O); bad input and diverged losses fail the same way again."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 (the rule is kd_core.errors.is_retryable)
        return is_retryable(err)
    return False


def _skipped(node: str, key_label: str, log) -> dict:
    log.info("%s: up to date in DVC, skipped", node)
    console.say(f"{console.mark('skip')} {key_label} up to date (DVC)")
    return {"skipped": True, "stage": node}


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient)
def stage_task(stage: str, node: str, params_path: str, overrides: dict | None = None, key: str | None = None,
               dvc_root: str | None = None, verdict: str = "ask"):
    """One stage for one key: skipped when DVC finds it up to date, else run and recorded in DVC. `verdict`: what
    the flow's up-front `dvc status` settled (`_verdicts`): "skip", "run", or "ask" DVC again now."""
    log = get_run_logger()
    name = console.label(stage, key)
    dvc = DvcBook(Path(dvc_root)) if dvc_root else DvcBook.off("")
    if dvc.enabled and _up_to_date(dvc, node, verdict):
        return Completed(name="Skipped", message="up to date (DVC)", data=_skipped(node, name, log))
    cfg = load_config(params_path, overrides)
    with console.stage(name, log) as lines:  # ▶ / ✓ lines (console and run log), the stage's progress bar
        launcher = launcher_for(stage, cfg, key)  # training.launcher set: torchrun / deepspeed (kd_core.launcher)
        on_ray = training_on_ray(stage, cfg, key)  # execution.stages names it: a Ray Train job (kd_core.cluster)
        if on_ray:
            run_training_job(stage, key, params_path, overrides, cfg, on_ray, log)
            result = launched_result(stage, cfg, key)
        elif launcher:
            run_launched(stage, key, params_path, overrides, launcher, log)
            result = launched_result(stage, cfg, key)
        elif cfg.orchestration.max_parallel_students > 1 and stage in SIDE_BY_SIDE:
            run_as_process(stage, key, params_path, overrides, log)  # not a thread: torch's RNG is per process
            result = launched_result(stage, cfg, key)
        else:
            result = run_stage(stage, cfg, key)
        dvc.record(node, background=True)  # committed while the next stage runs; readers of dvc.lock wait for it
        lines.note = console.note(stage, result, cfg.tracking.champion.metric)
    return result


def _up_to_date(dvc: DvcBook, node: str, verdict: str) -> bool:
    return verdict == "skip" or (verdict == "ask" and not dvc.changes(node))


def _verdicts(nodes: list[Node], stale: set[str]) -> dict[str, str]:
    """What each node will do, from one `dvc status` of every stage taken before any runs (`stale`: the changed
    ones). Changed: "run" (nothing done in this flow makes it up to date). Up to date with every producer up to
    date too: "skip" (nothing upstream will run). Up to date but downstream of a node that runs: "ask" DVC
    again in its turn (the producer may write the same outputs again, and then it stays up to date)."""
    verdicts: dict[str, str] = {}
    for node in nodes:  # in dependency order
        ups = [verdicts[p.name] for p in producers(node, nodes)]
        verdicts[node.name] = "run" if node.name in stale else "skip" if all(v == "skip" for v in ups) else "ask"
    return verdicts


def _inline(node: Node, cfg, dvc: DvcBook, verdict: str) -> dict:
    """A node whose stage does not apply to its key, run in the flow (no task), asking and recording DVC."""
    log = get_run_logger()
    name = console.label(node.stage.name, node.key)
    if dvc.enabled and _up_to_date(dvc, node.name, verdict):
        return _skipped(node.name, name, log)
    start = time.perf_counter()
    result = run_stage(node.stage.name, cfg, node.key)
    dvc.record(node.name, background=True)
    log.info("%s: not configured for %s, run in the flow (no task)", node.name, node.key)
    took = console.seconds(time.perf_counter() - start)
    console.say(f"{console.mark('skip')} {name} not configured (no task, {took})")
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

    from kd_core.interrupts import on_sigterm

    on_sigterm(chain=True)  # SIGTERM (a cancel): the training stage in a task thread checkpoints and stops
    cfg = load_config(params_path, overrides)
    console.quiet_mlflow_registry()
    log = get_run_logger()
    check_cluster(cfg)  # execution.engine ray: the cluster answers and can hold each stage's workers
    _config_artifact(cfg, params_path, overrides)
    dvc = DvcBook.for_run(params_path, overrides)
    if not dvc.enabled:
        log.info("DVC bookkeeping off: %s; every stage runs", dvc.reason)
    for line in untracked_inputs(cfg):
        log.warning(line)
    nodes = expand(cfg)
    paths = RunPaths.of(cfg)
    console.say(f"flow run {flow_run.name}: {len(nodes)} stages into {cfg.run_dir}", log)
    with run_lock(paths):  # one pipeline at a time per run folder; its stages and launched ranks pass
        parent = tracking.start_pipeline_run(cfg, paths.root)
        try:
            results = _run_nodes(cfg, nodes, params_path, overrides, dvc)
        except BaseException:
            settle_commits_quietly(log)  # the stages that finished stay recorded: the rerun skips them
            end_failed_run_quietly(parent, log)
            raise
        skipped = [name for name, r in results.items() if isinstance(r, dict) and r.get("skipped")]
        registered = results["register"] if "register" not in skipped else json.loads(paths.registry.read_text())
        report = results["compare"] if "compare" not in skipped else saved_report(paths)
        experiment_id = tracking.experiment_of(parent)
        mlflow_page = console.mlflow_ui(tracking.tracking_uri(cfg), experiment_id, parent)
        create_markdown_artifact(markdown=comparison_markdown(Path(report["markdown"]), mlflow_page),
                                 key="kd-comparison", description="registered models compared")
        pushed = dvc.push()
        if pushed:
            log.info(pushed)
        git = git_revision()
        tracking.end_pipeline_run(
            parent, params=cfg.model_dump(mode="json"),
            tags={"kd.git_commit": git["commit"], "kd.git_dirty": git["dirty"], "kd.skipped_stages": str(len(skipped)),
                  "kd.dvc": "recorded" if dvc.enabled else f"off: {dvc.reason}",
                  "kd.prefect_flow_run": f"{flow_run.name} ({flow_run.id})"},
            artifacts={"config": Path(params_path), "reports": paths.reports}
            | ({"lineage": dvc.root / "dvc.lock"} if dvc.enabled else {}))
        return {"run_dir": cfg.run_dir, "registered": registered, "compare": report, "skipped": skipped,
                "dvc": pushed or dvc.reason or "recorded", "tracking_uri": tracking.tracking_uri(cfg),
                "mlflow_run": {"run_id": parent, "experiment_id": experiment_id} | mlflow_page,
                "flow_run": {"id": str(flow_run.id), "name": flow_run.name}}


def end_failed_run_quietly(parent: str, log) -> None:
    """Close the pipeline's MLflow run as FAILED; when that fails too (the server gone, a full disk under MLflow's
    printed link) it is logged, not raised: the run's own error is the one to report (the next run closes a
    parent left RUNNING as KILLED)."""
    try:
        tracking.end_pipeline_run(parent, status="FAILED")
    except Exception as err:  # noqa: BLE001 (logged; the run's failure propagates)
        log.warning("MLflow pipeline run %s not closed: %s", parent, err)


def settle_commits_quietly(log) -> None:
    """Wait for the background DVC commits of a failing run; one that failed too is logged, not raised (the
    run's own error is the one to report)."""
    try:
        settle_commits()
    except Exception as err:  # noqa: BLE001 (logged; the run's failure propagates)
        log.warning("DVC commit failed: %s", err)


def _run_nodes(cfg, nodes: list[Node], params_path: str, overrides: dict | None, dvc: DvcBook) -> dict[str, dict]:
    """Every node as a task, each waiting for the tasks that write what it reads; a node whose stage does not
    apply runs inline, in its turn (`_wait_turn`); their results by node name.

    DVC is asked once, up front, for every stage (`DvcBook.changed`, `_verdicts`); only a node downstream of
    one that ran asks again in its turn."""
    workers = cfg.orchestration.max_parallel_students
    futures: dict[str, object] = {}
    inline: dict[str, dict] = {}
    verdicts = _verdicts(nodes, dvc.changed()) if dvc.enabled else {n.name: "run" for n in nodes}
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        for node in nodes:  # in dependency order: every producer is submitted (or run inline) before its readers
            waits = [futures[p.name] for p in producers(node, nodes) if p.name in futures]
            if node.stage.applies is not None and not node.stage.applies(cfg, node.key):
                _wait_turn(waits, list(futures.values()), workers)
                inline[node.name] = _inline(node, cfg, dvc, verdicts[node.name])
                continue
            run_name = f"{node.stage.name}-{node.key}" if node.key else node.stage.name  # e.g. distill-fkl
            configured = stage_task.with_options(name=node.stage.name, task_run_name=run_name,
                                                 retries=cfg.orchestration.retries)
            args = {"stage": node.stage.name, "node": node.name, "params_path": params_path, "overrides": overrides,
                    "key": node.key, "dvc_root": str(dvc.root) if dvc.enabled else None,
                    "verdict": verdicts[node.name]}
            futures[node.name] = runner.submit(configured, args, wait_for=waits)
        done = {name: future.result() for name, future in futures.items()}
    return {n.name: done[n.name] if n.name in done else inline[n.name] for n in nodes}


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
