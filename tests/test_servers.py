"""The pipeline against real servers over HTTP: an `mlflow server` (sqlite backend, artifacts on disk, basic
auth with infra/mlflow/basic_auth.ini) and a `prefect server`, both started here on free ports of 127.0.0.1 and
stopped at teardown, even on failure.

1. `kd run` (the Prefect flow) with PREFECT_API_URL / MLFLOW_TRACKING_URI pointing at them; runs, registered
   versions, the `champion` alias and the flow run's state are then read back through the servers' APIs.
2. `kd serve --cron` (a scheduled deployment served by a process), a run triggered with `run_deployment`
   completes and registers new versions.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port, tiny_params, write_params

KD = str(Path(sys.executable).with_name("kd"))
BIN = Path(sys.executable).parent
DEPLOYMENT = "kd-scheduled-test"
CRON = "0 3 * * *"

pytestmark = pytest.mark.slow


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with all its children (uvicorn/gunicorn workers)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    fh = log.open("w")
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, empty_stores):
    """(mlflow_url, prefect_api_url, base env for clients, server folder); both servers stopped at teardown."""
    root = tmp_path_factory.mktemp("servers")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", DO_NOT_TRACK="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    empty_stores.seed_prefect(root / "prefect-home" / "prefect.db")
    empty_stores.seed_mlflow(root / "mlflow.db")
    m_port, p_port = free_port(), free_port()
    # MLflow behind basic auth with the team setup's auth config (infra/mlflow/basic_auth.ini), users in tmp
    auth_ini = (REPO / "infra/mlflow/basic_auth.ini").read_text()
    (root / "basic_auth.ini").write_text(re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{root}/auth.db",
                                                auth_ini))
    password = secrets.token_hex(12)
    mlflow_env = dict(env, MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                      MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    started: list[subprocess.Popen] = []
    try:
        started.append(_start(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(m_port), "--workers", "1",
             "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            mlflow_env, root / "mlflow.log", root))
        started.append(_start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(p_port), "--no-ui"],
                              env, root / "prefect.log", root))
        mlflow_url, prefect_url = f"http://127.0.0.1:{m_port}", f"http://127.0.0.1:{p_port}/api"
        _wait_healthy(f"{mlflow_url}/health", started[0], root / "mlflow.log")
        _wait_healthy(f"{prefect_url}/health", started[1], root / "prefect.log")
        client_env = dict(env, MLFLOW_TRACKING_URI=mlflow_url, PREFECT_API_URL=prefect_url,
                          MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        yield mlflow_url, prefect_url, client_env, root
    finally:
        for proc in started:
            _stop(proc)


def _small_params(run_dir: str) -> dict:
    """The conftest tiny run cut further: one student, few steps, few prompts."""
    p = tiny_params(run_dir=run_dir)
    del p["students"]["sft"]
    for model in (p["teacher"], p["students"]["fkl"]):
        model["training"] = dict(model["training"], max_steps=3)
    p["students"]["fkl"].pop("finetune")
    p["evaluation"].update(limit=3, sample_seeds=[0], exaccerr_prompts=0)
    p["evaluation"]["generation"]["max_new_tokens"] = 4
    return p


def _prefect_client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Client()


def _login(monkeypatch, env: dict) -> None:
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, env[key])


def test_mlflow_server_requires_basic_auth(servers, monkeypatch):
    from kd_core.errors import PreflightError
    from kd_core.tracking.store import check_tracking

    mlflow_url, _, env, _ = servers
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5)
    assert err.value.code == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(PreflightError, match=r"refused no credentials \(401\): set MLFLOW_TRACKING_USERNAME"):
        check_tracking(mlflow_url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(PreflightError, match=r"refused user 'admin' \(401\)"):
        check_tracking(mlflow_url)
    _login(monkeypatch, env)
    check_tracking(mlflow_url)


def test_flow_against_real_mlflow_and_prefect_servers(servers, tmp_path, monkeypatch):
    """Reads back only what this run wrote (its experiment and model names, its run folder, its flow run), so the
    assertions hold in any order of the module's tests on the shared servers."""
    mlflow_url, prefect_url, env, server_root = servers
    _login(monkeypatch, env)
    params = _small_params("runs/served")
    params["tracking"].update(experiment="served", registered_model="kd-served-student",
                              register_teacher_as="kd-served-teacher")
    write_params(tmp_path, params)
    out = subprocess.run([KD, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"MLflow store:    {mlflow_url}" in out.stdout
    assert not (tmp_path / "mlflow.db").exists(), "tracking went to a local file, not the server"

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    exp = client.get_experiment_by_name("served")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("kd.role") == "pipeline"]
    assert [r.data.tags["kd.run_dir"] for r in parent] == ["runs/served"]
    parent_id = parent[0].info.run_id
    stages = {r.data.tags.get("kd.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert {"prepare", "train_teacher", "distill", "evaluate", "register"} <= stages
    students = client.search_model_versions("name='kd-served-student'")
    assert [(v.tags["kd.model"], v.tags["kd.run_dir"]) for v in students] == [("fkl", "runs/served")]
    assert [v.tags["kd.role"] for v in client.search_model_versions("name='kd-served-teacher'")] == ["teacher"]
    champion = client.get_model_version_by_alias("kd-served-student", "champion")
    assert champion.version == students[0].version
    # the weights went through the server's artifact proxy into its artifact folder (the client has no store)
    assert len(list((server_root / "artifacts" / exp.experiment_id).rglob("model.safetensors"))) == 2  # teacher, fkl

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = re.fullmatch(r".* \((.+)\)", parent[0].data.tags["kd.prefect_flow_run"]).group(1)
    with _prefect_client(prefect_url) as pc:
        assert pc.read_flow_run(flow_run_id).state.type.value == "COMPLETED"
        task_runs = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert {t.name for t in task_runs} >= {"prepare", "train_teacher", "distill-fkl", "register", "compare"}
        assert all(t.state.is_completed() for t in task_runs)


def test_scheduled_deployment_runs_from_the_server(servers, tmp_path, monkeypatch):
    from prefect.deployments import run_deployment

    mlflow_url, prefect_url, env, _ = servers
    _login(monkeypatch, env)
    params = write_params(tmp_path, _small_params("runs/scheduled"))
    serve_env = dict(env, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = tmp_path / "serve.log"
    serving = _start([KD, "serve", "--params", str(params), "--cron", CRON, "--name", DEPLOYMENT],
                     serve_env, log, tmp_path)
    try:
        with _prefect_client(prefect_url) as pc:
            deadline, deployment = time.time() + 90, None
            while deployment is None and time.time() < deadline:
                assert serving.poll() is None, log.read_text()[-3000:]
                try:
                    deployment = pc.read_deployment_by_name(f"kd-pipeline/{DEPLOYMENT}")
                except Exception:  # not registered yet
                    time.sleep(0.5)
            assert deployment is not None, log.read_text()[-3000:]
            assert [s.schedule.cron for s in deployment.schedules] == [CRON]
            assert deployment.parameters == {"params_path": str(params)}

        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: prefect_url}):
            flow_run = run_deployment(f"kd-pipeline/{DEPLOYMENT}", timeout=240, poll_interval=1)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
        assert flow_run.deployment_id == deployment.id
    finally:
        _stop(serving)
    assert serving.returncode is not None
    assert (tmp_path / "runs/scheduled/registry.json").is_file()
    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    run_dirs = {v.tags["kd.run_dir"] for v in client.search_model_versions("name='kd-student'")}
    assert "runs/scheduled" in run_dirs


THREE_RUNS = "kd-three-runs-test"
PINNED_METRIC = "pinned/rougeL_sampled_mean"


def _three_runs_params() -> dict:
    """`_small_params` on a local data file under data/ and a pinned eval set; two tiny students; the
    champion read on the pinned set with a paired test. Registered under names of its own (the module's
    other tests register kd-student). Trained long enough (a few seconds a model) and sampled at a low
    temperature for ROUGE-L on the pinned prompts to be above 0, so that the champion rule compares numbers."""
    p = _small_params("runs/three")
    p["tokenizer"] = {"vocab_size": 500, "max_length": 96}  # whole rows: the responses are not cut off
    training = dict(p["teacher"]["training"], max_steps=200, learning_rate=0.01)
    p["teacher"]["training"] = p["students"]["fkl"]["training"] = training
    p["students"]["sft"] = {"method": "sft", "teacher": "teacher", "train_data": "train",
                            "model": p["students"]["fkl"]["model"], "training": training}
    p["data"] = {"source": "file", "path": "data/train.jsonl", "template": "minimal",
                 # split seed 3: here the third run's sft student scores above the first run's best on the
                 # pinned prompts, so the paired test decides (the assertions hold whichever way it goes)
                 "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 3},
                 "eval_sets": {"pinned": {"path": "data/pinned.jsonl", "limit": 40}}}
    p["evaluation"].update(eval_sets=["test", "pinned"], limit=20, sample_seeds=[0], exaccerr_prompts=0)
    p["evaluation"]["generation"].update(max_new_tokens=8, temperature=0.3)
    p["tracking"] = {"experiment": "three-runs", "registered_model": "kd-3r-student",
                     "register_teacher_as": "kd-3r-teacher",
                     "champion": {"metric": PINNED_METRIC, "min_delta": 0.0, "significance": 0.5}}
    return p


def _wait_for_deployment(pc, name: str, serving: subprocess.Popen, log: Path, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert serving.poll() is None, log.read_text()[-3000:]
        try:
            return pc.read_deployment_by_name(f"kd-pipeline/{name}")
        except Exception:  # not registered yet
            time.sleep(0.5)
    raise AssertionError(f"deployment {name} not registered after {timeout}s:\n{log.read_text()[-3000:]}")


def test_scheduled_deployment_three_runs_skip_and_champion(servers, tmp_path, monkeypatch):
    """Issue 12, item 6: a served, scheduled deployment in a git + DVC project, triggered three times.
    1. everything trains, one version per model, `champion` set; 2. nothing changed: every task run ends
    `Skipped`, nothing registered, a fraction of the first run's time; 3. rows appended to the local data
    file: every stage runs (all read the data), a new version per model, and `champion` moves only if the
    challenger is better on the pinned prompts (identical across runs) with paired-test p < significance."""
    import json

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from kd_core.data.builtin import generate_builtin
    from kd_core.io import write_jsonl_atomic
    from kd_core.stages.prepare import prompt_key
    from tests.conftest import dvc_project, dvc_status

    mlflow_url, prefect_url, env, _ = servers
    _login(monkeypatch, env)
    params = _three_runs_params()
    dvc_project(tmp_path, params)
    rows = generate_builtin(300, 0)
    seen = {prompt_key(r) for r in rows}
    pinned = [r for r in generate_builtin(600, 0) if prompt_key(r) not in seen][:40]
    write_jsonl_atomic(tmp_path / "data/train.jsonl", rows[:240])
    write_jsonl_atomic(tmp_path / "data/pinned.jsonl", pinned)
    rule = params["tracking"]["champion"]
    student_model, teacher_model = params["tracking"]["registered_model"], params["tracking"]["register_teacher_as"]
    models = ["teacher", *params["students"]]
    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    registry = tmp_path / "runs/three/registry.json"

    def versions() -> dict[str, list]:
        found = client.search_model_versions(f"name='{teacher_model}'") + \
            client.search_model_versions(f"name='{student_model}'")
        by_model: dict[str, list] = {name: [] for name in models}
        for v in found:
            by_model[v.tags["kd.model"]].append(int(v.version))
        return {name: sorted(numbers) for name, numbers in by_model.items()}

    def champion() -> int:
        return int(client.get_model_version_by_alias(student_model, "champion").version)

    def pinned_metric(version: int) -> float:
        return client.get_run(client.get_model_version(student_model, str(version)).run_id).data.metrics[PINNED_METRIC]

    def run_once(pc) -> tuple[object, float, float, list]:
        """One run triggered on the server: the flow run, its wall time seen from here and on the server
        (Running -> end), and its task runs."""
        start = time.monotonic()
        with temporary_settings({PREFECT_API_URL: prefect_url}):
            flow_run = run_deployment(f"kd-pipeline/{THREE_RUNS}", timeout=400, poll_interval=1)
        wall = time.monotonic() - start
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
        assert flow_run.deployment_id == deployment.id
        tasks = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        return flow_run, wall, (flow_run.end_time - flow_run.start_time).total_seconds(), tasks

    log = tmp_path / "serve.log"
    serving = _start([KD, "serve", "--params", str(tmp_path / "params.yaml"), "--cron", CRON, "--name", THREE_RUNS],
                     dict(env, PREFECT_RUNNER_POLL_FREQUENCY="1"), log, tmp_path)
    timings: dict[str, tuple[float, float]] = {}
    try:
        with _prefect_client(prefect_url) as pc:
            deployment = _wait_for_deployment(pc, THREE_RUNS, serving, log)
            assert [s.schedule.cron for s in deployment.schedules] == [CRON]

            # 1. everything trains: one version per model, champion set
            _, wall, on_server, tasks = run_once(pc)
            timings["first"] = (wall, on_server)
            assert {t.name for t in tasks} >= {"prepare", "train_teacher", "distill-fkl", "distill-sft", "register"}
            assert all(t.state.is_completed() and t.state.name != "Skipped" for t in tasks)
            first_tasks = sorted(t.name for t in tasks)
            after_first = versions()
            assert {name: len(v) for name, v in after_first.items()} == {name: 1 for name in models}
            first_decision = json.loads(registry.read_text())["champion"]
            assert first_decision["moved"] is True and champion() == first_decision["version"]
            assert dvc_status(tmp_path) == {}

            # 2. nothing changed: every task run skipped (DVC up to date), nothing registered, fast
            _, wall, on_server, tasks = run_once(pc)
            timings["second"] = (wall, on_server)
            assert sorted(t.name for t in tasks) == first_tasks  # the same tasks, each one skipped
            assert [t.state.name for t in tasks if t.state.name != "Skipped"] == []
            assert all(t.state.is_completed() for t in tasks)
            assert versions() == after_first
            assert json.loads(registry.read_text())["champion"] == first_decision
            old_champion = champion()

            # 3. new rows in the local data file: every stage reads the data, so every stage runs
            write_jsonl_atomic(tmp_path / "data/train.jsonl", rows)
            _, wall, on_server, tasks = run_once(pc)
            timings["third"] = (wall, on_server)
            assert all(t.state.is_completed() and t.state.name != "Skipped" for t in tasks)
    finally:
        _stop(serving)
        print("\nwall times (client, server) in s:", {k: (round(a, 1), round(b, 1)) for k, (a, b) in timings.items()})
    assert serving.returncode is not None

    assert timings["second"][1] < 0.4 * timings["first"][1], timings
    after_third = versions()
    for name in models:  # a new version of every model (new data, new weights)
        assert len(after_third[name]) == 2 and after_third[name][0] in after_first[name], after_third
    new_students = {max(after_third[name]) for name in params["students"]}
    # every version was evaluated on the same pinned prompts (so all of them are compared)
    tags = {int(v.version): json.loads(client.get_run(v.run_id).data.tags["kd.lineage"]) | v.tags  # (the lineage:
            for v in client.search_model_versions(f"name='{student_model}'")}                        # prompts' hash)
    assert len({t["kd.eval_prompts.pinned"] for t in tags.values()}) == 1, tags

    decision = json.loads(registry.read_text())["champion"]
    now = champion()
    best = max(tags, key=pinned_metric)
    if decision["moved"]:
        assert now == decision["version"] != old_champion and now in new_students
        assert pinned_metric(now) > pinned_metric(old_champion) + rule["min_delta"]
        assert decision["paired_test"]["p_value"] < rule["significance"]
    else:
        assert now == old_champion, decision
        if pinned_metric(best) > pinned_metric(old_champion) + rule["min_delta"]:
            assert decision["reason"] == f"not significant at p < {rule['significance']}", decision
            test = decision["paired_test"]
            assert test is None or test["p_value"] >= rule["significance"], decision
        else:
            assert decision["reason"] == "already champion" or decision["reason"].startswith("best "), decision
    print("pinned metric by version:", {v: round(pinned_metric(v), 2) for v in sorted(tags)},
          "\nchampion decision of the third run:", decision)
    assert dvc_status(tmp_path) == {}
