"""The Prefect flow: the kd_core stages as tasks, students in parallel up to
`orchestration.max_parallel_students`. Tasks only load the config and call the stage function.

Run ad hoc with `kd run` (a temporary local Prefect server), serve on a schedule with `kd serve --cron` or
deploy to a work pool with `prefect deploy` (prefect.yaml).
"""

from __future__ import annotations

import kd_core  # noqa: F401  (offline defaults first)

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from kd_core import stages, tracking
from kd_core.config import ConfigError, load_config
from kd_core.data.sources import DataError
from kd_core.models import ModelError
from kd_core.preflight import PreflightError, TrackingUnreachable
from kd_core.training import TrainingDiverged

# Bad input will fail the same way again: retry only what may be transient (I/O, a server).
# A diverged loss (NaN/inf) recurs too: same seed, same data, resumed from the same checkpoint.
NOT_RETRIED = (ConfigError, DataError, ModelError, PreflightError, TrainingDiverged, FileNotFoundError, KeyError,
               LookupError)


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TrackingUnreachable:  # a preflight error, but a server that is down may be back on the next try
        return True
    except NOT_RETRIED:
        return False
    except Exception:
        return True
    return False


def _stage_task(name: str):
    fn = stages.STAGES[name]

    @task(name=name, cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient)
    def run_stage(params_path: str, overrides: dict | None = None, model: str | None = None):
        cfg = load_config(params_path, overrides)
        paths = stages.RunPaths.of(cfg)
        return fn(cfg, paths, model) if model is not None else fn(cfg, paths)

    return run_stage


prepare_task = _stage_task("prepare")
train_teacher_task = _stage_task("train_teacher")
transfer_task = _stage_task("transfer")
distill_task = _stage_task("distill")
finetune_task = _stage_task("finetune")
evaluate_task = _stage_task("evaluate")
register_task = _stage_task("register")
compare_task = _stage_task("compare")


@flow(name="kd-pipeline", log_prints=True)
def kd_pipeline(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = load_config(params_path, overrides)
    args = {"params_path": params_path, "overrides": overrides}

    def configured(task_, model: str | None = None):
        run_name = f"{task_.name}-{model}" if model else task_.name
        return task_.with_options(task_run_name=run_name, retries=cfg.orchestration.retries)

    configured(prepare_task)(**args)
    configured(train_teacher_task)(**args)
    with ThreadPoolTaskRunner(max_workers=cfg.orchestration.max_parallel_students) as runner:
        finished: dict[str, object] = {}  # model name -> future of its last training task
        transfers: dict[str, object] = {}

        def after(model: str) -> list:
            return [finished[model]] if model in finished else []  # the teacher is already trained

        for name in cfg.chain_order():  # teacher assistants before the students they teach
            st = cfg.students[name]
            waits = after(st.teacher)
            if st.train_data in cfg.transfer_sets:
                if st.train_data not in transfers:
                    source = cfg.transfer_sets[st.train_data].source
                    transfers[st.train_data] = runner.submit(configured(transfer_task, st.train_data),
                                                             args | {"model": st.train_data}, wait_for=after(source))
                waits = waits + [transfers[st.train_data]]
            distilled = runner.submit(configured(distill_task, name), args | {"model": name}, wait_for=waits)
            finished[name] = runner.submit(configured(finetune_task, name), args | {"model": name}, wait_for=[distilled])
        evals = [runner.submit(configured(evaluate_task, name), args | {"model": name}, wait_for=after(name))
                 for name in [cfg.teacher.name, *cfg.students]]
        for future in evals:
            future.result()
    registered = configured(register_task)(**args)
    report = configured(compare_task)(**args)
    with open(report["markdown"], encoding="utf-8") as fh:
        create_markdown_artifact(markdown=fh.read(), key="kd-comparison", description="registered models compared")
    return {"run_dir": cfg.run_dir, "registered": registered, "compare": report,
            "tracking_uri": tracking.tracking_uri(cfg)}
