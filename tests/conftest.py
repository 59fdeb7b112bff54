"""Shared fixtures: a tiny configuration that trains in seconds, and an isolated project folder."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "2")
import kd_core  # noqa: E402,F401  (offline defaults)

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {"config": {"arch": "gpt2", "n_layer": 1, "hidden": 32, "n_head": 2}}
TINY_TRAINING = {"max_steps": 6, "learning_rate": 0.003, "batch_size": 16, "logging_steps": 2, "warmup_ratio": 0.0}

TINY_PARAMS = {
    "run_dir": "runs/tiny",
    "seed": 0,
    "data": {"source": "builtin", "builtin_examples": 240, "template": "minimal",
             "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}},
    "tokenizer": {"vocab_size": 300, "max_length": 48},
    "teacher": {"name": "teacher", "model": {"config": {"arch": "gpt2", "n_layer": 1, "hidden": 48, "n_head": 2}},
                "training": TINY_TRAINING},
    "transfer_sets": {},
    "students": {
        "sft": {"method": "sft", "teacher": "teacher", "train_data": "train", "model": TINY_MODEL, "training": TINY_TRAINING},
        "fkl": {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl", "model": TINY_MODEL, "training": TINY_TRAINING,
                "finetune": {"enabled": True, "epochs": 0.2, "lr_scale": 0.1}},
    },
    "evaluation": {"eval_sets": ["test"], "limit": 6, "sample_seeds": [0, 1],
                   "generation": {"max_new_tokens": 6, "batch_size": 8}},
    "tracking": {"experiment": "tiny", "champion": {"metric": "test/rougeL_sampled_mean", "min_delta": 0.0}},
}


def tiny_params(**top_level) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params.update(top_level)
    return params


@pytest.fixture
def project(tmp_path, monkeypatch):  # noqa: D103
    """An empty project folder as cwd, with its own MLflow store and Prefect home."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))  # `kd run` subprocesses: their own history
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / ".dvc-site-cache"))  # not /var/tmp/dvc
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # a previous test's stage may have set the process-wide URI
    yield tmp_path
    mlflow.set_tracking_uri(None)


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_pipeline(folder: Path) -> None:
    """What `dvc repro` needs in a project besides params.yaml: the generated dvc.yaml, the code it runs (a
    code dependency of every stage) and the data folder that `prepare` depends on."""
    import shutil

    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    shutil.copytree(REPO / "kd_core", folder / "kd_core", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "README.md").write_text("local data files and eval sets (a DVC dependency of prepare)\n")


def dvc_project(project: Path, params: dict) -> None:
    """The project as a git + DVC repository with the tiny params, the generated dvc.yaml and the code."""
    import subprocess
    import sys

    write_params(project, params)
    copy_pipeline(project)
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                         "--allow-empty", "-m", "init"],
                [str(Path(sys.executable).with_name("dvc")), "init", "-q"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)


def dvc_status(project: Path) -> dict:
    """`dvc status` of the project's pipeline: {} when every stage is up to date."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return repo.status()


def registered_versions(name: str) -> list:
    """The versions of registered model `name` in the current MLflow store ([] when there is none; an
    unreadable store raises instead of passing for an empty one)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient().search_model_versions(f"name='{name}'")
