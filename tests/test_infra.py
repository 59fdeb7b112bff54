"""The team-setup configs in infra/ agree with the code: compose services' commands parse with the real CLIs,
env names are the ones MLflow / Prefect / the pipeline read, the worker's pool is prefect.yaml's, every
${VAR} is documented in .env.example (with placeholder values only), the Kubernetes work-pool template is
what Prefect accepts."""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import mlflow
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
COMPOSE_TEXT = (INFRA / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]


def _env_example() -> dict[str, str]:
    out = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} against `env`; $$ is a literal $."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise KeyError(f"{name} is not set ({arg})")
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value).replace("$$", "$")


def _service_env(name: str) -> dict[str, str]:
    env = SERVICES[name].get("environment", {})
    return {k: _interpolate(str(v), _env_example()) for k, v in env.items()}


def test_compose_has_the_team_services():
    assert set(SERVICES) == {"mlflow-db", "prefect-db", "minio", "minio-init", "mlflow", "prefect-server",
                             "prefect-worker", "ray-head", "ray-worker"}
    for name, svc in SERVICES.items():
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"


def test_every_variable_is_in_env_example_with_a_placeholder_value():
    example = _env_example()
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_TEXT))
    assert used <= set(example), f"not documented in infra/.env.example: {sorted(used - set(example))}"
    secrets = [k for k in example if re.search(r"PASSWORD|SECRET", k)]
    assert secrets and all(example[k].startswith("change-me") for k in secrets), "no real secrets in the example"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/.env (the real secrets) must be git-ignored"


def test_mlflow_service_command_parses_and_uses_postgres_minio_and_basic_auth(monkeypatch):
    from mlflow.cli import server as mlflow_server
    from mlflow.environment_variables import (MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_AUTH_CONFIG_PATH,
                                              MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_S3_ENDPOINT_URL,
                                              MLFLOW_SERVER_ALLOWED_HOSTS)

    svc = SERVICES["mlflow"]
    env = _service_env("mlflow")
    assert svc["command"][:2] == ["mlflow", "server"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = mlflow_server.make_context("server", list(svc["command"][2:]))  # the real CLI parses it (and its env)
    assert ctx.params["app_name"] == "basic-auth" and ctx.params["host"] == "0.0.0.0"
    assert ctx.params["backend_store_uri"].startswith("postgresql://mlflow:")
    assert ctx.params["backend_store_uri"].endswith("@mlflow-db:5432/mlflow")
    bucket = env["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").strip("/")
    assert ctx.params["artifacts_destination"] == f"s3://{bucket}/"
    assert "password" not in " ".join(svc["command"]).lower(), "no secret in argv"
    for var in (MLFLOW_S3_ENDPOINT_URL, MLFLOW_AUTH_CONFIG_PATH, MLFLOW_AUTH_ADMIN_PASSWORD,
                MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_SERVER_ALLOWED_HOSTS):
        assert var.name in env
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","), "the worker reaches it as mlflow:5000"
    # the bucket the init job creates is the artifact destination
    init = " ".join(SERVICES["minio-init"]["entrypoint"])
    assert "mc mb --ignore-existing \"kd/$$MLFLOW_ARTIFACT_BUCKET\"" in init
    assert _service_env("minio-init")["MLFLOW_ARTIFACT_BUCKET"] == bucket


def test_mlflow_auth_config_is_read_by_mlflow(monkeypatch):
    # mlflow.server.auth's package needs Flask-WTF (the [auth] extra, in the server image only): load the
    # config reader on its own
    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    env = _service_env("mlflow")
    copied = INFRA / "mlflow" / "basic_auth.ini"
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"COPY basic_auth.ini {env['MLFLOW_AUTH_CONFIG_PATH']}" in dockerfile
    assert SERVICES["mlflow"]["build"] == "./mlflow"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(copied))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    auth = auth_config.read_auth_config()
    assert auth.default_permission == "READ" and auth.admin_username == "admin"
    assert auth.auth_cache_ttl_seconds == 60
    assert len(_env_example()["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12, "MLflow refuses a shorter admin password"
    raw = configparser.ConfigParser()
    raw.read(copied)
    assert "admin_password" not in raw["mlflow"], "the admin password comes from the env, not the file"
    # the auth database sits on the service's volume
    mount = next(v.split(":")[1] for v in SERVICES["mlflow"]["volumes"] if v.startswith("mlflow-auth:"))
    assert auth.database_uri == f"sqlite:///{mount}/basic_auth.db"
    # pinned to the project's MLflow
    pinned = re.search(r'"mlflow==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"mlflow[auth]=={pinned}"' in dockerfile


def test_prefect_server_and_worker_match_prefect_yaml_and_the_code():
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL

    server = SERVICES["prefect-server"]
    assert server["command"][:3] == ["prefect", "server", "start"]
    server_env = _service_env("prefect-server")
    assert server_env[PREFECT_API_DATABASE_CONNECTION_URL.name].startswith("postgresql+asyncpg://prefect:")
    pinned = re.search(r'"prefect==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert server["image"].startswith(f"prefecthq/prefect:{pinned}-")

    worker = SERVICES["prefect-worker"]
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    command = " ".join(worker["command"])
    started = re.search(r"prefect worker start --pool (\S+) --type (\S+)", command)
    assert started and {started.group(1)} == pools and started.group(2) == "process"
    env = _service_env("prefect-worker")
    port = server["command"][server["command"].index("--port") + 1]
    assert env[PREFECT_API_URL.name] == f"http://prefect-server:{port}/api"
    # prefect.yaml's pull step changes into KD_PROJECT_DIR: the project is mounted there
    assert "{{ $KD_PROJECT_DIR }}" in (REPO / "prefect.yaml").read_text()
    assert f"..:{env['KD_PROJECT_DIR']}" in worker["volumes"]
    # MLflow: the URI the pipeline reads (kd_core/tracking/store.py) and the basic-auth login MLflow's client reads
    from mlflow.environment_variables import (MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_URI,
                                              MLFLOW_TRACKING_USERNAME)

    assert "MLFLOW_TRACKING_URI" in (REPO / "kd_core/tracking/store.py").read_text()
    assert env[MLFLOW_TRACKING_URI.name] == "http://mlflow:5000"
    assert env[MLFLOW_TRACKING_USERNAME.name] == "admin"
    assert env[MLFLOW_TRACKING_PASSWORD.name] == _service_env("mlflow")["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env)  # DVC's S3 remote


def test_every_secret_is_required_and_none_has_a_default():
    """Compose interpolates the whole file before it starts anything, so one `${X:?message}` makes X required:
    every secret of .env.example is required that way (the stack refuses to start without it), and none is ever
    written `${X:-default}` (a default would be a secret known to everyone)."""
    references = re.findall(r"\$\{(\w+)(:[-?])?", COMPOSE_TEXT)
    secrets = {k for k in _env_example() if re.search(r"PASSWORD|SECRET", k)}
    required = {name for name, op in references if op == ":?"}
    defaulted = {name for name, op in references if op == ":-"}
    assert secrets and secrets <= required, f"secrets without ${{X:?...}}: {sorted(secrets - required)}"
    assert not secrets & defaulted, f"secrets with a default: {sorted(secrets & defaulted)}"


def test_kubernetes_work_pool_template_is_what_prefect_accepts():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())
    pool = WorkPoolCreate(name="kd-k8s", type="kubernetes", base_job_template=template)  # Prefect's own check
    assert pool.base_job_template == template
    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    rendered = apply_values(template["job_configuration"], defaults | {"command": "prefect flow-run execute"})
    job = rendered["job_manifest"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == props["image"]["default"]
    assert container["env"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert container["envFrom"] == [{"secretRef": {"name": "kd-pipeline-credentials"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not any(re.search(r"PASSWORD|SECRET|TOKEN", k) for k in container["env"]), "credentials via the Secret only"


# ------------------------------------------------------------------------------------------- Ray (execution.engine: ray)
RAY_PIN = re.search(r'ray = \["ray\[train\]==([\d.]+)"\]', (REPO / "pyproject.toml").read_text()).group(1)


def _ray_start(args: list[str]) -> dict:
    """`ray start ARGS` parsed by Ray's own CLI: its parameters."""
    import pytest

    pytest.importorskip("ray")
    from ray.scripts.scripts import start

    assert args[:2] == ["ray", "start"] or args[0].endswith("/ray") and args[1] == "start", args
    return start.make_context("start", args[2:]).params


def _exec_line(service: str) -> list[str]:
    """The `exec ...` command at the end of a service's `sh -c` script, interpolated and split."""
    import shlex

    script = _interpolate(SERVICES[service]["command"][-1], _env_example())
    return shlex.split(script.rsplit("exec ", 1)[1])


def test_compose_ray_nodes_parse_with_ray_and_join_one_head():
    """The head and worker nodes' `ray start` lines parse with Ray's CLI; the worker and the Prefect worker (a node
    without CPUs, the flow's driver) join the head's port; every node mounts the checkout where the Prefect worker
    does (the run folders at one path on every node) and runs the project's `ray` extra (one Ray version)."""
    head = _ray_start(_exec_line("ray-head"))
    assert head["head"] and head["block"] and head["num_cpus"] == int(_env_example()["RAY_HEAD_CPUS"])
    address = f"ray-head:{head['port']}"
    worker = _ray_start([_interpolate(str(a), _env_example()) for a in SERVICES["ray-worker"]["command"]])
    assert worker["address"] == address and worker["block"]
    assert _service_env("prefect-worker")["RAY_ADDRESS"] == address
    joined = " ".join(SERVICES["prefect-worker"]["command"])
    assert '/venv/bin/ray start --address "$$RAY_ADDRESS" --num-cpus 0' in joined
    for service in ("prefect-worker", "ray-head"):  # the project with its ray extra: the pinned Ray everywhere
        assert '"/project[ray]"' in " ".join(SERVICES[service]["command"])
    assert SERVICES["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    project = next(v for v in SERVICES["prefect-worker"]["volumes"] if v.startswith(".."))
    for service in ("ray-head", "ray-worker"):
        assert project in SERVICES[service]["volumes"]
        assert _service_env(service)["RAY_AUTH_MODE"] == "disabled"


def test_kuberay_cluster_and_job_match_the_project():
    """The KubeRay RayCluster runs the pinned Ray in the work pool's image, a CPU and a GPU worker group whose Ray
    GPUs are the pod's, the run folders' claim mounted at one path on every pod; the RayJob targets that cluster
    and runs `kd run` with an override that the project's own config loader accepts."""
    import shlex

    from kd_core.cli import _overrides
    from kd_core.config import load_config

    cluster = yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())
    pool = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())["variables"]["properties"]
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == \
        ("ray.io/v1", "RayCluster", "ray.io/v1", "RayJob")
    assert cluster["spec"]["rayVersion"] == RAY_PIN
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    for pod in pods:
        container = pod["containers"][0]
        assert container["image"] == pool["image"]["default"]
        assert {"name": "runs", "mountPath": "/project/runs"} in container["volumeMounts"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims["runs"] == pool["runs_volume_claim"]["default"]
    gpu = groups["gpu"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == \
        int(gpu["rayStartParams"]["num-gpus"])
    for params in [cluster["spec"]["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in groups.values())]:
        args = [a for k, v in params.items() for a in ([f"--{k}"] if v == "true" else [f"--{k}", v])]
        _ray_start(["ray", "start", "--address", "x:6379", *args])  # each key is one of `ray start`'s options
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["kd", "run"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    cfg = load_config(REPO / argv[argv.index("--params") + 1], _overrides(sets))
    assert cfg.execution.engine == "ray"
