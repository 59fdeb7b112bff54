"""The soak (issue 18, item 3): a scheduled deployment served by `kd serve` on a real `prefect server`, tracking
on a real `mlflow server` (both on 127.0.0.1), in a git + DVC project of the tiny config; five runs fired back to
back with `run_deployment`, one fault injected per run by the deterministic hooks of kd_core/faults.py:

1. clean: everything trains, one version per model;
2. rows appended to the data file, SIGTERM at fkl's distillation step 1 (a cancellation): the flow run crashes
   on the termination signal, the stage checkpoints and stops;
3. nothing changed, the disk fills up once fkl's checkpoint of step 3 (its last) is written: the final model
   cannot be written, the flow run fails naming the folder;
4. nothing changed, the MLflow server SIGKILLed right after `register` created the teacher's new version (then
   restarted on the same store): the flow run fails naming the server, the version is left `kd.pending`;
5. clean, nothing changed: the finished stages are skipped, the cut-off version is completed, fkl's registered.

How the faults reach a run: a served deployment runs each flow run in a child process of the `kd serve` process,
with that process's environment (Prefect's Runner spawns it; job variables are not applied to served flows). So
`kd serve` is started again before every run with the run's hook variables in its environment, and stopped after
it (the deployment keeps its name, id and schedule; only the serving process changes).

After every run: no version lost or duplicated (versions per model, none `kd.pending` after a completing run, the
registered weight hashes = the weights the completing runs ended with), DVC consistent (`Repo.status()`: no
finished stage changed, the interrupted one not recorded; `Repo.data_status()`: no uncommitted change in an output
of a finished stage, nothing recorded missing from the cache) and the failure named (the flow run's state and
message, the stage's one line). The figures go to the test's tmp folder (soak.json) and are printed.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_core.faults import DISK_FULL_AFTER_CHECKPOINT_ENV, KILL_TRACKING_ENV, SIGTERM_AT_STEP_ENV
from tests.test_faults import MlflowServer
from tests.test_servers import (BIN, CRON, KD, _prefect_client, _small_params, _start, _stop, _wait_for_deployment,
                                _wait_healthy)

pytestmark = pytest.mark.slow

SOAK = "kd-soak-test"
TEACHER_MODEL, STUDENT_MODEL = "kd-soak-teacher", "kd-soak-student"
RUN_DIR = "runs/soak"


def _soak_params() -> dict:
    """`_small_params` on a local data file (appending rows changes the data), fkl checkpointing every 2 steps
    (checkpoints at 2 and 3, its last), registered under names of its own."""
    p = _small_params(RUN_DIR)
    p["data"] = {"source": "file", "path": "data/train.jsonl", "template": "minimal",
                 "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}}
    p["students"]["fkl"]["training"] = dict(p["students"]["fkl"]["training"], save_steps=2)
    p["tracking"] = {"experiment": "soak", "registered_model": STUDENT_MODEL, "register_teacher_as": TEACHER_MODEL}
    return p


@pytest.fixture
def soak_servers(tmp_path, empty_stores):
    """A `prefect server` and a restartable `mlflow server` (tests/test_faults.py) on loopback ports; the base
    environment of the serving processes. Both stopped at teardown, also on failure."""
    from tests.conftest import free_port

    root = tmp_path / "servers"
    (root / "mlflow").mkdir(parents=True)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
               PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_SITE_CACHE_DIR=str(tmp_path / ".dvc-site-cache"), PREFECT_RUNNER_POLL_FREQUENCY="1")
    env.pop("PREFECT_API_URL", None)
    empty_stores.seed_prefect(root / "prefect-home" / "prefect.db")
    port = free_port()
    prefect = _start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                     env, root / "prefect.log", root)
    mlflow = MlflowServer(root / "mlflow", empty_stores)
    try:
        mlflow.ensure_running()  # meanwhile the Prefect server boots
        prefect_url = f"http://127.0.0.1:{port}/api"
        _wait_healthy(f"{prefect_url}/health", prefect, root / "prefect.log")
        yield mlflow, prefect_url, dict(env, PREFECT_API_URL=prefect_url, MLFLOW_TRACKING_URI=mlflow.url)
    finally:
        mlflow.stop()
        _stop(prefect)


def _finished_nodes(cfg, nodes, task_runs) -> set[str]:
    """The nodes that finished in a flow run: its completed task runs (run or `Skipped`), and the nodes run
    inline (a stage that does not apply: no task) whose producers all finished."""
    from kd_core.pipeline.dag import producers

    completed = {t.name for t in task_runs if t.state.is_completed()}
    finished: set[str] = set()
    for node in nodes:  # in dependency order
        inline = node.stage.applies is not None and not node.stage.applies(cfg, node.key)
        if inline:
            if all(p.name in finished for p in producers(node, nodes)):
                finished.add(node.name)
        elif (f"{node.stage.name}-{node.key}" if node.key else node.stage.name) in completed:
            finished.add(node.name)
    return finished


def _dvc_problems(project: Path, finished: set[str], interrupted: str | None) -> tuple[list[str], set[str]]:
    """What is inconsistent between the finished stages, dvc.lock, the DVC cache and the workspace; the stages
    `dvc status` finds changed."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stale = {name.rsplit(":", 1)[-1] for name in repo.status()}
        data = repo.data_status()
        outs = {stage.name: [out.def_path.rstrip("/") for out in stage.outs] for stage in repo.index.stages}
    problems = [f"dvc status: finished stage {name} changed" for name in sorted(finished & stale)]
    if interrupted is not None and interrupted not in stale:
        problems.append(f"dvc status: the interrupted stage {interrupted} is recorded as up to date")
    uncommitted = {path.rstrip("/") for change in data["uncommitted"].values() for path in change
                   if isinstance(path, str)}
    for name in sorted(finished):
        for out in outs.get(name, []):
            dirty = [p for p in uncommitted if p == out or p.startswith(out + "/")]
            if dirty:
                problems.append(f"dvc data status: output {out} of finished stage {name} uncommitted: {dirty}")
    if data["not_in_cache"]:
        problems.append(f"dvc data status: recorded in dvc.lock, not in the cache: {data['not_in_cache']}")
    return problems, stale


def test_soak_scheduled_runs_with_one_fault_each(soak_servers, tmp_path, monkeypatch):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from kd_core.config import load_config
    from kd_core.data.builtin import generate_builtin
    from kd_core.io import tree_hash, write_jsonl_atomic
    from kd_core.run import RunPaths
    from kd_core.pipeline.dag import expand
    from tests.conftest import dvc_project

    mlflow, prefect_url, env = soak_servers
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", env["DVC_SITE_CACHE_DIR"])  # this process's DVC calls
    project = tmp_path / "project"
    project.mkdir()
    params = _soak_params()
    dvc_project(project, params)
    rows = generate_builtin(300, 0)
    write_jsonl_atomic(project / "data/train.jsonl", rows[:240])
    cfg = load_config(project / "params.yaml")
    nodes = expand(cfg)
    paths = RunPaths(project / cfg.run_dir)
    models = {cfg.teacher.name: TEACHER_MODEL, **{name: STUDENT_MODEL for name in cfg.students}}
    client = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)

    # the weights each model ended with in the runs that completed (what must be registered, once each)
    trained: dict[str, set[str]] = {name: set() for name in models}
    figures: dict = {"runs": 0, "faults_injected": 0, "failures": 0, "failures_named": 0, "completed": 0,
                     "inconsistencies": 0, "runs_detail": []}

    def registered() -> dict[str, list]:
        found: dict[str, list] = {name: [] for name in models}
        for reg_name in sorted(set(models.values())):
            for v in client.search_model_versions(f"name='{reg_name}'"):
                found[v.tags["kd.model"]].append(v)
        return found

    def registry_problems(completed: bool, pending_expected: dict[str, str]) -> list[str]:
        """Lost or duplicated versions: one version per distinct weights (kd.model_hash), the registered hashes
        = the trained ones (+ a cut-off version's, still pending), `kd.pending` only where a fault left it."""
        problems = []
        for name, versions in registered().items():
            hashes = [v.tags["kd.model_hash"] for v in versions]
            if len(hashes) != len(set(hashes)):
                problems.append(f"{name}: duplicated version {sorted(hashes)}")
            pending = {v.tags["kd.model_hash"] for v in versions if "kd.pending" in v.tags}
            expect_pending = {pending_expected[name]} if name in pending_expected else set()
            if pending != expect_pending:
                problems.append(f"{name}: pending versions {pending}, expected {expect_pending}")
            if set(hashes) != trained[name] | expect_pending:
                problems.append(f"{name}: registered weights {sorted(set(hashes))} != trained "
                                f"{sorted(trained[name] | expect_pending)}")
        if completed:  # registry.json names, for every model, the version of the weights in its folder
            record = json.loads(paths.registry.read_text())["versions"]
            for name, reg_name in models.items():
                v = client.get_model_version(reg_name, str(record[name]["version"]))
                if v.tags["kd.model_hash"] != tree_hash(paths.model(name)):
                    problems.append(f"{name}: registry.json's version {v.version} is not the weights in its folder")
        return problems

    def fire(number: int, fault: str, hooks: dict[str, str]):
        """Serve the deployment with `hooks` in the serving process's environment, trigger one run, wait for its
        end, stop serving: (the flow run, its task runs, its wall time, the serving log)."""
        log = tmp_path / f"serve-{number}.log"
        serving = _start([KD, "serve", "--params", str(project / "params.yaml"), "--cron", CRON, "--name", SOAK],
                         dict(env, **hooks), log, project)
        start = time.monotonic()
        try:
            with _prefect_client(prefect_url) as pc:
                deployment = _wait_for_deployment(pc, SOAK, serving, log)
                with temporary_settings({PREFECT_API_URL: prefect_url}):
                    flow_run = run_deployment(f"kd-pipeline/{SOAK}", timeout=400, poll_interval=1)
                assert flow_run.deployment_id == deployment.id
                assert flow_run.state.is_final(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
                tasks = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        finally:
            _stop(serving)
        wall = time.monotonic() - start
        figures["runs"] += 1
        figures["faults_injected"] += fault != "none"
        return flow_run, tasks, wall, log.read_text()

    def check(number: int, fault: str, flow_run, tasks, wall: float, log: str, *, interrupted: str | None = None,
              flow_says: str = "", named: list[str] = (), pending: dict[str, str] | None = None) -> None:
        """The run's figures and every inconsistency found; fails at the first run that has one. A failed run is
        named when the flow run's state message says `flow_says` (the root cause, not a later error masking it)
        and every part of `named` is in that message or in those of its task runs that did not complete."""
        completed, missing = flow_run.state.is_completed(), []
        if completed:
            figures["completed"] += 1
            for name in models:
                trained[name].add(tree_hash(paths.model(name)))
        else:
            figures["failures"] += 1
            # what the server says: the flow run's state message and those of its task runs that did not complete
            text = "\n".join([flow_run.state.message or ""] +
                              [f"{t.name}: {t.state.message}" for t in tasks if not t.state.is_completed()])
            missing = [part for part in named if part not in text]
            if flow_says not in (flow_run.state.message or ""):
                missing.append(f"flow run: {flow_says}")
            figures["failures_named"] += bool(flow_says) and not missing
        finished = _finished_nodes(cfg, nodes, tasks)
        problems, stale = _dvc_problems(project, finished, interrupted)
        if completed and stale:
            problems.append(f"dvc status after a completed run: {sorted(stale)}")
        problems += registry_problems(completed, pending or {})
        if missing:
            problems.append(f"failure not named: {missing} not in {text!r}")
        figures["inconsistencies"] += len(problems)
        counts = {name: len(v) for name, v in registered().items()}
        figures["runs_detail"].append({
            "run": number, "fault": fault, "state": flow_run.state.type.value, "message": flow_run.state.message,
            "wall_s": round(wall, 1), "finished_stages": sorted(finished), "dvc_changed": sorted(stale),
            "versions": counts, "problems": problems})
        print(f"run {number} ({fault}): {flow_run.state.type.value} in {wall:.1f} s, versions {counts}, "
              f"{flow_run.state.message!r}")
        assert problems == [], f"run {number} ({fault}):\n" + "\n".join(problems) + f"\n{log[-3000:]}"

    soak_start = time.monotonic()
    try:
        # 1. clean: everything trains and is registered
        flow_run, tasks, wall, log = fire(1, "none", {})
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log[-3000:]}"
        assert all(t.state.name != "Skipped" for t in tasks)
        check(1, "none", flow_run, tasks, wall, log)

        # 2. new rows (every stage is due), SIGTERM at fkl's step 1: a cancellation, the stage checkpoints at the
        # next step boundary (1 or 2: the signal reaches the main thread while the task's thread trains)
        write_jsonl_atomic(project / "data/train.jsonl", rows)
        fault = "SIGTERM at distill@fkl step 1"
        flow_run, tasks, wall, log = fire(2, fault, {SIGTERM_AT_STEP_ENV: "distilled/fkl:1"})
        assert flow_run.state.type.value == "CRASHED", f"{flow_run.state}\n{log[-3000:]}"
        check(2, fault, flow_run, tasks, wall, log, interrupted="distill@fkl",
              flow_says="Execution was aborted by a termination signal.",
              named=[f"distill-fkl: Task run encountered an exception Cancelled: {RUN_DIR}/distilled/fkl: cancelled "
                     "(SIGTERM) at step "])

        # 3. nothing changed; the disk fills up once fkl's last checkpoint (step 3) is written: the final model
        # cannot be written, the previous one stays
        fault = "disk full after distill@fkl's checkpoint 3"
        flow_run, tasks, wall, log = fire(3, fault, {DISK_FULL_AFTER_CHECKPOINT_ENV: "distilled/fkl:3"})
        assert flow_run.state.is_failed(), f"{flow_run.state}\n{log[-3000:]}"
        check(3, fault, flow_run, tasks, wall, log, interrupted="distill@fkl",
              flow_says=f"WriteFailed: {RUN_DIR}/distilled/fkl: cannot write (File too large); the previous output "
                        "there is intact")

        # 4. nothing changed; distill resumes from checkpoint-3, the MLflow server is SIGKILLed once register has
        # created the teacher's new version (no client retries: the stage fails at once), then restarted
        fault = "MLflow server killed mid-registration"
        server = mlflow.proc
        flow_run, tasks, wall, log = fire(4, fault, {KILL_TRACKING_ENV: str(server.pid),
                                                     "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        assert server.poll() is not None, "the hook did not kill the MLflow server"
        assert flow_run.state.is_failed(), f"{flow_run.state}\n{log[-3000:]}"
        mlflow.ensure_running()  # back, on the same store
        # the stage lost the server mid-way (TrackingLost: retryable), the flow's retry found it gone (the message)
        assert re.search(r"✗ register failed after [\d.]+ s: TrackingLost\n▶ register\n"
                         r"✗ register failed after [\d.]+ s: TrackingUnreachable\n", log), log[-3000:]
        check(4, fault, flow_run, tasks, wall, log, interrupted="register",
              flow_says=f"TrackingUnreachable: preflight of register: MLflow tracking server {mlflow.url} is not "
                        "reachable ([Errno 111] Connection refused)",
              pending={cfg.teacher.name: tree_hash(paths.model(cfg.teacher.name))})

        # 5. clean, nothing changed: the finished stages skipped, the cut-off version completed, fkl registered
        flow_run, tasks, wall, log = fire(5, "none", {})
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log[-3000:]}"
        skipped = {t.name for t in tasks if t.state.name == "Skipped"}
        assert {"prepare", "train_teacher", "distill-fkl", "evaluate-teacher", "evaluate-fkl"} <= skipped, skipped
        check(5, "none", flow_run, tasks, wall, log)
    finally:
        figures["wall_s"] = round(time.monotonic() - soak_start, 1)
        figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
        figures["versions"] = {name: sorted(int(v.version) for v in vs) for name, vs in registered().items()} \
            if mlflow.proc is not None and mlflow.proc.poll() is None else None
        (tmp_path / "soak.json").write_text(json.dumps(figures, indent=1))
        print("\nsoak figures:", json.dumps({k: v for k, v in figures.items() if k != "runs_detail"}))

    assert figures["runs"] == 5 and figures["faults_injected"] == 3
    assert figures["failures"] == figures["failures_named"] == 3 and figures["completed"] == 2
    assert figures["inconsistencies"] == 0
    assert figures["versions"] == {cfg.teacher.name: [1, 2], "fkl": [1, 2]}
