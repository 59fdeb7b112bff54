"""Shared fixtures: a tiny configuration that trains in seconds, and an isolated project folder."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "2")
# DVC keeps per-repository state (hash and link databases) under a site cache, /var/tmp/dvc by default: every
# test's DVC, in this process or a child, uses a folder of the session's instead (the `project` fixture gives
# each test its own), removed at the end, so the suite leaves nothing outside temporary folders
os.environ["DVC_SITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd-tests-dvc-site-")
atexit.register(shutil.rmtree, os.environ["DVC_SITE_CACHE_DIR"], True)
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


def pytest_collection_modifyitems(session, config, items) -> None:
    """The modules with slow (end-to-end) tests run first, each kept whole (its module fixtures, e.g. servers, are
    made once): with several workers (`make test`: pytest-xdist, work stealing) the long tests start early and the
    short ones fill the gaps, instead of one long test finishing alone at the end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: file order kept within


def tiny_params(**top_level) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params.update(top_level)
    return params


# ------------------------------------------------------------------------------- empty stores, migrated once a run
# A fresh MLflow store runs MLflow's migrations when first opened (~2 s), a fresh Prefect database Prefect's
# (~6 s, in every temporary server: `kd run`'s, `prefect_test_harness`'s, the server tests'). Each test still gets
# stores of its own: copies of one empty pair migrated once a run, so only the first test pays the migrations.
_MIGRATE_PREFECT = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def migrate():  # what a Prefect server does on its first start (its lifespan): migrations, block types
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
        await session.commit()

asyncio.run(migrate())
"""
_MIGRATE_MLFLOW = """
import sqlite3, sys, tempfile
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

with tempfile.TemporaryDirectory() as artifacts:
    SqlAlchemyStore(f"sqlite:///{sys.argv[1]}", artifacts).engine.dispose()
# without its Default experiment, whose artifact folder is this temporary one: MLflow creates it again, with the
# artifact root of the store's first user, in each copy
with sqlite3.connect(sys.argv[1]) as db:
    db.execute("DELETE FROM experiment_tags")
    db.execute("DELETE FROM experiments")
"""


def _copy_file(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@dataclass(frozen=True)
class EmptyStores:
    """An empty Prefect database and MLflow store (sqlite), migrated to the installed versions' schemas."""

    prefect_db: Path
    mlflow_db: Path

    def seed_prefect(self, db: Path) -> Path:
        """A copy of the empty Prefect database at `db` (e.g. PREFECT_HOME/prefect.db, a server's default)."""
        return _copy_file(self.prefect_db, db)

    def seed_mlflow(self, db: Path) -> Path:
        """A copy of the empty MLflow store at `db` (a `sqlite:///` tracking URI's file)."""
        return _copy_file(self.mlflow_db, db)

    @contextmanager
    def prefect_harness(self):
        """Prefect's `prefect_test_harness` (a temporary Prefect server on a database of its own, the API URL set
        while it runs), its database a copy of the empty one."""
        from unittest import mock

        import prefect.testing.utilities as utilities

        def seeded_mkdtemp() -> str:  # the harness's folder, where it puts its database as prefect-test.db
            folder = tempfile.mkdtemp()
            self.seed_prefect(Path(folder) / "prefect-test.db")
            return folder

        with mock.patch.object(utilities, "mkdtemp", seeded_mkdtemp), utilities.prefect_test_harness():
            yield


def made_once(tmp_path_factory, name: str, make) -> tuple[Path, str]:
    """The folder `name` of this test run, made by `make(folder)` (which may return a text) in the first pytest
    process that asks; the xdist workers of one run share it through a file lock in their common temporary folder.
    (the folder, the text)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder of this run that every worker's basetemp is in
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(make(folder) or "", encoding="utf-8")
    return folder, done.read_text(encoding="utf-8")


def _migrate_empty_stores(folder: Path) -> None:
    """Prefect's and MLflow's migrations side by side, each in a process of its own (a Prefect home of its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(folder / "prefect-home")
    (folder / "prefect-home").mkdir()
    migrations = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
                  for script, args in ((_MIGRATE_PREFECT, []), (_MIGRATE_MLFLOW, [str(folder / "mlflow.db")]))]
    for proc in migrations:
        _, err = proc.communicate()
        assert proc.returncode == 0, f"migrating an empty store: {err[-3000:]}"


@pytest.fixture(scope="session")
def empty_stores(tmp_path_factory) -> EmptyStores:
    """The run's `EmptyStores`, made once a run (`made_once`)."""
    folder, _ = made_once(tmp_path_factory, "empty-stores", _migrate_empty_stores)
    return EmptyStores(folder / "prefect-home" / "prefect.db", folder / "mlflow.db")


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """The temporary files of the tests and of every process they start (MLflow's model downloads, torchrun's
    log folders, the stage worker's socket) go to a folder of this pytest process, removed at its end, instead of
    the system's temporary folder (pytest's own folders, fixed before, stay where they are)."""
    tmp_path_factory.getbasetemp()
    folder = tempfile.mkdtemp(prefix="kd-tests-tmp-")  # short: a Unix socket's path has ~100 characters
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = folder, None
    yield Path(folder)
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def project(tmp_path, monkeypatch, empty_stores, request):  # noqa: D103
    """An empty project folder as cwd, with its own MLflow store and Prefect home: copies of the migrated empty
    ones, or none at all for a test marked `fresh_stores` (a user's first run: the pipeline creates them)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))  # `kd run` subprocesses: their own history
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / ".dvc-site-cache"))  # not /var/tmp/dvc
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if not request.node.get_closest_marker("fresh_stores"):
        empty_stores.seed_prefect(tmp_path / ".prefect" / "prefect.db")
        empty_stores.seed_mlflow(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # a previous test's stage may have set the process-wide URI
    yield tmp_path
    mlflow.set_tracking_uri(None)


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it; the caller binds it soon after)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_pipeline(folder: Path) -> None:
    """What `dvc repro` needs in a project besides params.yaml: the generated dvc.yaml, the code it runs (a
    code dependency of every stage) and the data folder that `prepare` depends on."""
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    shutil.copytree(REPO / "kd_core", folder / "kd_core", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "README.md").write_text("local data files and eval sets (a DVC dependency of prepare)\n")


def dvc_project(project: Path, params: dict) -> None:
    """The project as a git + DVC repository with the tiny params, the generated dvc.yaml and the code."""
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


def dvc_stages_matching_the_flow(project: Path) -> dict:
    """The DVC stages of the project's dvc.yaml and params.yaml ({name: stage}), checked to be the flow's nodes with
    the same data dependencies (code and params dependencies aside)."""
    from dvc.repo import Repo

    from kd_core.config import load_config
    from kd_core.pipeline.dag import expand

    nodes = expand(load_config(project / "params.yaml"))
    with Repo(str(project)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
    assert {n.name for n in nodes} == set(stages)
    for node in nodes:
        deps = [str(d) for d in stages[node.name].deps
                if not str(d).startswith("kd_core") and type(d).__name__ != "ParamsDependency"]
        assert sorted(deps) == sorted(node.deps), node.name
    return stages


def registered_versions(name: str) -> list:
    """The versions of registered model `name` in the current MLflow store ([] when there is none; an
    unreadable store raises instead of passing for an empty one)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient().search_model_versions(f"name='{name}'")


# ---------------------------------------------------------------------------------- a prepared project, once a run
PREPARED_STAGES = ("prepare", "train_teacher")
# what a copy leaves behind: the session's own stores and DVC's temporary state (locks, the hash db of its inodes)
_NOT_COPIED = shutil.ignore_patterns("mlflow.db", "mlartifacts", "mlruns", ".prefect", ".dvc-site-cache", "tmp")


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory, empty_stores) -> Path:
    """A git + DVC project of the tiny params (`dvc_project`) whose data, tokenizer and teacher are made once a run
    (`made_once`): `prepare` and `train_teacher` run in process and recorded in DVC (dvc.lock, .dvc/cache). A test
    copies it into its own folder with `copy_prepared`; with the same `data`, `tokenizer` and `teacher` params
    DVC finds those two stages up to date there (`dvc repro` and the flow skip them), whatever the students."""
    return made_once(tmp_path_factory, "prepared", lambda root: _prepare_project(root, empty_stores))[0]


def _prepare_project(root: Path, empty_stores: EmptyStores) -> None:
    import mlflow

    from kd_core.config import parse_config
    from kd_core.pipeline.dvc import DvcBook
    from kd_core.pipeline.one_stage import run_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DVC_SITE_CACHE_DIR", str(root / ".dvc-site-cache"))
        mp.setenv("PREFECT_HOME", str(root / ".prefect"))
        uri = f"sqlite:///{empty_stores.seed_mlflow(root / 'mlflow.db')}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            dvc_project(root, TINY_PARAMS)
            cfg = parse_config(TINY_PARAMS)
            book = DvcBook(root)
            for stage in PREPARED_STAGES:
                run_stage(stage, cfg)
                book.record(stage)
        finally:
            mlflow.set_tracking_uri(None)


def copy_prepared(prepared: Path, folder: Path, params: dict | None = None) -> None:
    """The prepared project (`prepared_project`) copied into `folder` (git and DVC repository, dvc.yaml, code, DVC
    cache, the run folder's data, tokenizer and teacher), without the session's MLflow store, Prefect home or
    DVC state; then `params` (default: the tiny params) as its params.yaml."""
    shutil.copytree(prepared, folder, ignore=_NOT_COPIED, dirs_exist_ok=True, symlinks=True)
    write_params(folder, TINY_PARAMS if params is None else params)


def reproduced_params() -> dict:
    """The tiny params with one student (fkl: one `kd stage` process per stage), champion on val/ppl."""
    params = tiny_params()
    del params["students"]["sft"]
    params["tracking"]["champion"].update(metric="val/ppl", mode="min")
    return params


@pytest.fixture(scope="session")
def reproduced_project(prepared_project, tmp_path_factory, empty_stores) -> tuple[Path, str]:
    """A copy of the prepared project with `reproduced_params`, reproduced once a run (`made_once`) by `dvc repro`
    (prepare and train_teacher up to date, every other stage a `kd stage` process), its own MLflow store, Prefect
    home and DVC site cache inside: (the folder, the output of that `dvc repro`). Tests copy it (`copy_reproduced`)."""
    return made_once(tmp_path_factory, "reproduced", lambda root: _reproduce(prepared_project, root, empty_stores))


def _reproduce(prepared_project: Path, root: Path, empty_stores: EmptyStores) -> str:
    copy_prepared(prepared_project, root, reproduced_params())
    empty_stores.seed_mlflow(root / "mlflow.db")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PREFECT_HOME=str(root / ".prefect"), DVC_SITE_CACHE_DIR=str(root / ".dvc-site-cache"),
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=root, env=env, check=True, capture_output=True)
    out = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"dvc repro:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def copy_reproduced(reproduced: Path, folder: Path, stores: bool) -> None:
    """The reproduced project copied into `folder`, with a copy of its MLflow store (`stores`) or without it. The
    copy's experiment keeps its artifact folder: the session folder's `mlartifacts` (where the registered
    versions' weights are, read by the copy; a version the copy registers would be written there too)."""
    ignore = shutil.ignore_patterns("mlartifacts", ".prefect", ".dvc-site-cache", "tmp") if stores else _NOT_COPIED
    shutil.copytree(reproduced, folder, ignore=ignore, dirs_exist_ok=True, symlinks=True)
