"""Running the pipeline's stages: one stage on its run folder (`run_stage`, what `kd stage` and the flow call), one
node of the flow (`run_node`: ask DVC, run or skip, record), and a whole pipeline run's bookkeeping
(`PipelineRun`: the run folder's lock, the MLflow parent run, DVC's verdicts up front, the summary at the end).

The Prefect flow (flows/pipeline.py) only wires these to Prefect: one task per node, each waiting for the
nodes that write what it reads.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kd_core.pipeline.cluster.dispatch import run_training_job, training_on_ray
from kd_core.config import load_config
from kd_core.pipeline import console
from kd_core.pipeline.dag import Node, expand, producers
from kd_core.pipeline.dvc import DvcBook, settle_commits, untracked_inputs
from kd_core.pipeline.launcher import launched_result, launcher_for, run_as_process, run_launched
from kd_core.pipeline.lock import run_lock
from kd_core.pipeline.one_stage import run_stage
from kd_core.run import RunPaths
from kd_core.stages import get_stage
from kd_core.tracking import store

# the stages that may run alongside others (every stage between `train_teacher` and `register`, `train_teacher`
# alongside a transfer set's or another teacher's): with `orchestration.max_parallel_students` > 1 each runs as a
# `kd stage` process of its own (`kd_core.pipeline.launcher.run_as_process`)
SIDE_BY_SIDE = {"train_teacher", "transfer", "cache_teacher", "distill", "finetune", "evaluate"}
# the stages that read dvc.lock (the version lineage of what they register): the flow's background commits of the
# stages before them are settled first
READS_DVC_LOCK = {"register"}


def launch(stage: str, key: str | None, cfg, params_path: str, overrides: dict | None, log) -> dict:
    """Run a stage of the flow where it runs: as a Ray Train job (`execution.stages`), under its launcher (`training.launcher`: torchrun / deepspeed), as a
    `kd stage` process of its own when stages run side by side (torch's RNG is per process, not per thread), else
    in this process."""
    on_ray = training_on_ray(stage, cfg, key)  # execution.stages names it: a Ray Train job (kd_core.pipeline.cluster)
    if on_ray:
        run_training_job(stage, key, params_path, overrides, cfg, on_ray, log)
        return launched_result(stage, cfg, key)
    launcher = launcher_for(stage, cfg, key)
    if launcher:
        run_launched(stage, key, params_path, overrides, launcher, log)
        return launched_result(stage, cfg, key)
    if cfg.orchestration.max_parallel_students > 1 and stage in SIDE_BY_SIDE:
        run_as_process(stage, key, params_path, overrides, log)
        return launched_result(stage, cfg, key)
    return run_stage(stage, cfg, key)


def run_node(stage: str, node: str, key: str | None, cfg, params_path: str, overrides: dict | None, dvc: DvcBook,
             verdict: str, log) -> dict:
    """One node of the flow: skipped when DVC finds it up to date, else run and recorded in DVC (a `dvc commit` on a
    background thread, while the next stage runs). `verdict`: what the flow's up-front `dvc status` settled
    (`PipelineRun.verdicts`): "skip", "run", or "ask" DVC again now.

    A node whose stage applies to its key runs between a start and an end line (`launch`); one whose stage does
    not apply (`Stage.applies`: a student without post-distillation fine-tuning or a teacher cache) runs in this
    process, to write its outputs (a hard link, a manifest), with one line."""
    name = console.label(stage, key)
    if dvc.enabled and (verdict == "skip" or (verdict == "ask" and not dvc.changes(node))):
        log.info("%s: up to date in DVC, skipped", node)
        console.say(f"{console.mark('skip')} {name} up to date (DVC)")
        return {"skipped": True, "stage": node}
    if stage in READS_DVC_LOCK:
        settle_commits()
    if get_stage(stage).works_for(cfg, key):
        with console.stage(name, log) as lines:  # ▶ / ✓ lines (console and run log), the stage's progress bar
            result = launch(stage, key, cfg, params_path, overrides, log)
            dvc.record(node, background=True)  # committed while the next stage runs; readers of dvc.lock wait
            lines.note = console.note(stage, result, cfg.tracking.champion.metric)
        return result
    start = time.perf_counter()
    result = run_stage(stage, cfg, key)
    dvc.record(node, background=True)
    log.info("%s: not configured for %s, run in the flow (no task)", node, key)
    took = console.seconds(time.perf_counter() - start)
    console.say(f"{console.mark('skip')} {name} not configured (no task, {took})")
    return result


def run_task(stage: str, node: str, params_path: str, overrides: dict | None, key: str | None, dvc_root: str | None,
             verdict: str, log) -> dict:
    """`run_node` from a task's plain arguments (`PipelineRun.task_args`): the config read again from the params
    file and overrides, DVC's bookkeeping at `dvc_root` (None: off)."""
    cfg = load_config(params_path, overrides)
    dvc = DvcBook(Path(dvc_root)) if dvc_root else DvcBook.off("")
    return run_node(stage, node, key, cfg, params_path, overrides, dvc, verdict, log)


@dataclass
class PipelineRun:
    """One run of the whole pipeline: its config, its nodes in dependency order, DVC's bookkeeping, and the MLflow
    parent run its stages nest under."""

    cfg: object
    params_path: str
    overrides: dict | None
    dvc: DvcBook
    nodes: list[Node]
    paths: RunPaths
    parent: str = ""
    log: object = field(default=None, repr=False)

    @classmethod
    @contextlib.contextmanager
    def start(cls, cfg, params_path: str, overrides: dict | None, title: str, log) -> Iterator[PipelineRun]:
        """Hold the run folder's lock (one pipeline at a time per folder; its stages and launched ranks pass) and
        open the MLflow parent run while the block runs. On failure the stages that finished stay recorded in DVC
        (the rerun skips them) and the parent run is closed as FAILED; an error doing that is logged, not raised."""
        from kd_core.tracking import runs  # (MLflow: not imported by a `kd stage` that runs `run_stage` only)

        dvc = DvcBook.for_run(params_path, overrides)
        if not dvc.enabled:
            console.say(f"DVC bookkeeping off: {dvc.reason}; every stage runs", log)
        for line in untracked_inputs(cfg):
            log.warning(line)
        run = PipelineRun(cfg, str(params_path), overrides, dvc, expand(cfg), RunPaths.of(cfg), log=log)
        console.say(f"{title}: {len(run.nodes)} stages into {cfg.run_dir}", log)
        with run_lock(run.paths):
            run.parent = runs.start_pipeline_run(cfg, run.paths.root)
            try:
                yield run
            except BaseException:
                run._quietly(settle_commits, "DVC commit failed: %s")
                run._quietly(lambda: runs.end_pipeline_run(run.parent, status="FAILED"),
                             f"MLflow pipeline run {run.parent} not closed: %s")
                raise

    def run_inline(self, node: Node, verdict: str) -> dict:
        """`node` run in this process, in its turn (`run_node`): a node whose stage does no work for its key."""
        return run_node(node.stage.name, node.name, node.key, self.cfg, self.params_path, self.overrides, self.dvc,
                        verdict, self.log)

    def task_args(self, node: Node, verdict: str) -> dict:
        """What a node's task (another thread or process) needs to run it: `run_task`'s arguments, all plain values."""
        return {"stage": node.stage.name, "node": node.name, "params_path": self.params_path,
                "overrides": self.overrides, "key": node.key, "verdict": verdict,
                "dvc_root": str(self.dvc.root) if self.dvc.enabled else None}

    def _quietly(self, fn, message: str) -> None:
        """`fn()` while a run fails: its own error is logged (the run's error is the one to report)."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 (logged; the run's failure propagates)
            self.log.warning(message, err)

    def verdicts(self) -> dict[str, str]:
        """What each node will do, from one `dvc status` of every stage taken before any runs. Changed: "run"
        (nothing done in this flow makes it up to date). Up to date with every producer up to date too: "skip"
        (nothing upstream will run). Up to date but downstream of a node that runs: "ask" DVC again in its turn
        (the producer may write the same outputs again, and then it stays up to date). Every node "run" when DVC
        bookkeeping is off."""
        if not self.dvc.enabled:
            return {n.name: "run" for n in self.nodes}
        stale = self.dvc.changed()
        verdicts: dict[str, str] = {}
        for node in self.nodes:  # in dependency order
            ups = [verdicts[p.name] for p in producers(node, self.nodes)]
            if node.name in stale:
                verdicts[node.name] = "run"
            else:
                verdicts[node.name] = "skip" if all(v == "skip" for v in ups) else "ask"
        return verdicts

    def finish(self, results: dict[str, dict], flow_run: str) -> dict:
        """Close the run: the registered versions and the comparison (read back from the run folder where their
        stages were skipped), `dvc push` to a configured remote, the MLflow parent run closed with the resolved
        config, tags and files. The run's summary: run folder, registered versions, report, skipped nodes, DVC,
        the tracking store and the MLflow run (with its page: `console.mlflow_ui`)."""
        from kd_core.stages.compare import saved_report
        from kd_core.tracking import runs
        from kd_core.tracking.lineage import git_revision

        cfg, paths, dvc = self.cfg, self.paths, self.dvc
        skipped = [name for name, r in results.items() if isinstance(r, dict) and r.get("skipped")]
        registered = results["register"] if "register" not in skipped else json.loads(paths.registry.read_text())
        report = results["compare"] if "compare" not in skipped else saved_report(paths)
        experiment_id = runs.experiment_of(self.parent)
        uri = store.tracking_uri(cfg)
        pushed = dvc.push()
        if pushed:
            self.log.info(pushed)
        git = git_revision()
        runs.end_pipeline_run(
            self.parent, params=cfg.model_dump(mode="json"),
            tags={"kd.git_commit": git["commit"], "kd.git_dirty": git["dirty"], "kd.skipped_stages": str(len(skipped)),
                  "kd.dvc": "recorded" if dvc.enabled else f"off: {dvc.reason}", "kd.prefect_flow_run": flow_run},
            artifacts={"config": Path(self.params_path), "reports": paths.reports}
            | ({"lineage": dvc.root / "dvc.lock"} if dvc.enabled else {}))
        return {"run_dir": cfg.run_dir, "registered": registered, "compare": report, "skipped": skipped,
                "dvc": pushed or dvc.reason or "recorded", "tracking_uri": uri,
                "mlflow_run": {"run_id": self.parent, "experiment_id": experiment_id}
                | console.mlflow_ui(uri, experiment_id, self.parent)}

