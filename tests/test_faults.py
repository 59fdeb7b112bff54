"""Reliability under faults (issue 18): each fault injected at a deterministic point, and what is lost: nothing.

1. The MLflow server dies mid-`register` (after the preflight, between the registry's calls): one retryable line,
   exit 75; with the server back (same store) the rerun completes the cut-off version: one version per model.
2. A write fails (a full disk: RLIMIT_FSIZE, SIGXFSZ ignored, so writes raise EFBIG) while saving a checkpoint,
   the final model, a metrics file or the teacher cache: one line naming the path, exit 74, the previous output
   intact; the rerun resumes and ends with the weights of an uninterrupted run.
3. A checkpoint file truncated, a teacher-cache shard corrupted: found by their checksums, reported in one line
   naming the file; training falls back to the previous checkpoint, the cache is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_core.config import TrainingConfig, load_config
from kd_core.errors import CacheError
from kd_core.faults import DISK_FULL_AFTER_CHECKPOINT_ENV, KILL_TRACKING_ENV
from kd_core.io import CHECKSUMS, checksum_problem, tree_hash
from kd_core.pipeline.one_stage import run_stage
from kd_core.run import RunPaths
from kd_core.training.trainer import last_complete_checkpoint
from tests.conftest import TINY_MODEL, TINY_TRAINING, EmptyStores, free_port, tiny_params, write_params
from tests.test_servers import BIN, _small_params, _start, _stop, _wait_healthy

KD = str(Path(sys.executable).with_name("kd"))


# --------------------------------------------------------------------------------------------- a real MLflow server
class MlflowServer:
    """`mlflow server` on a loopback port, sqlite store (a copy of the run's empty one) and proxied artifacts in
    `root`; restartable on the same port and store after a test hook killed it."""

    def __init__(self, root: Path, empty_stores: EmptyStores):
        self.root, self.port = root, free_port()
        empty_stores.seed_mlflow(root / "mlflow.db")
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
                        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.proc: subprocess.Popen | None = None

    def ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = _start(["mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                            "--artifacts-destination", str(self.root / "artifacts")],
                           self.env, self.root / "mlflow.log", self.root)
        _wait_healthy(f"{self.url}/health", self.proc, self.root / "mlflow.log")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, empty_stores):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), empty_stores)
    try:
        server.ensure_running()
        yield server
    finally:
        server.stop()


@pytest.fixture
def on_server(project, mlflow_server, monkeypatch):
    """The project folder, tracking on the (running) server."""
    import mlflow

    mlflow_server.ensure_running()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    return project


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _kd_stage(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([KD, "stage", *args], cwd=folder, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, **env))


# --------------------------------------------------------------------------------------------- 1. MLflow server dies
@pytest.mark.slow
def test_mlflow_server_killed_mid_registration_then_rerun_completes_it(on_server, mlflow_server):
    from mlflow.tracking import MlflowClient

    from kd_core.pipeline.dag import expand

    params = _small_params("runs/faulty")
    params["tracking"] = {"experiment": "faults", "registered_model": "kd-f-student",
                          "register_teacher_as": "kd-f-teacher"}
    cfg = load_config(write_params(on_server, params))
    for node in expand(cfg):
        if node.stage.name not in ("register", "compare"):
            run_stage(node.stage.name, cfg, node.key)
    assert mlflow_server.proc.poll() is None

    # the server is SIGKILLed right after the teacher's version is created, before its description and the rest
    cut = _kd_stage(on_server, "register", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                    **{KILL_TRACKING_ENV: str(mlflow_server.proc.pid)})
    assert mlflow_server.proc.poll() is not None, "the hook did not kill the server"
    assert cut.returncode == 75, cut.stderr[-3000:]
    assert "Traceback" not in cut.stderr
    assert _error_lines(cut.stderr) == [
        f"error: register: MLflow tracking server {mlflow_server.url} stopped answering during the stage (it is not "
        "reachable ([Errno 111] Connection refused)): run the stage again once it is back; the rerun completes what "
        "was registered"], cut.stderr[-3000:]
    assert not (on_server / "runs/faulty/registry.json").exists()

    mlflow_server.ensure_running()  # back, on the same store
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    [half] = client.search_model_versions("name='kd-f-teacher'")  # what the fault left: a version cut off
    assert half.tags.get("kd.pending") == "true" and not half.description

    result = run_stage("register", cfg)
    assert {name: (v["version"], v["new"]) for name, v in result["versions"].items()} == {"teacher": (1, True),
                                                                                            "fkl": (1, True)}
    for name in ("kd-f-teacher", "kd-f-student"):
        [version] = client.search_model_versions(f"name='{name}'")  # exactly one version per model
        assert "kd.pending" not in version.tags and version.description, (name, version.tags)
        assert version.tags["kd.run_dir"] == "runs/faulty"
    assert client.get_model_version_by_alias("kd-f-student", "champion").version == "1"
    assert json.loads((on_server / "runs/faulty/registry.json").read_text())["versions"]["teacher"]["version"] == 1
    assert run_stage("register", cfg)["versions"]["fkl"] == {"registered_model": "kd-f-student", "version": 1,
                                                             "new": False}


# --------------------------------------------------------------------------------------------- 2. a write fails
def _teacher_params() -> dict:
    p = tiny_params()
    p["teacher"]["training"] = dict(TINY_TRAINING, max_steps=12, save_steps=5, logging_steps=4)
    return p


def _teacher_weights(folder: Path) -> dict:
    return load_file(folder / "runs/tiny/models/teacher/model.safetensors")


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_then_the_model_loses_nothing(on_server, tmp_path_factory):
    cfg = load_config(write_params(on_server, _teacher_params()))
    run_stage("prepare", cfg)
    straight = tmp_path_factory.mktemp("straight")
    shutil.copytree(on_server / "runs", straight / "runs")
    os.chdir(straight)
    try:
        run_stage("train_teacher", cfg)
    finally:
        os.chdir(on_server)
    ckpts = on_server / "runs/tiny/models/.teacher-checkpoints"
    model = on_server / "runs/tiny/models/teacher"

    # the disk fills up once the checkpoint of step 5 is written: the one of step 10 cannot be
    full = _kd_stage(on_server, "train_teacher", **{DISK_FULL_AFTER_CHECKPOINT_ENV: "models/teacher:5"})
    assert full.returncode == 74, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert _error_lines(full.stderr) == [
        "error: runs/tiny/models/.teacher-checkpoints/checkpoint-10: cannot write (File too large); checkpoint not "
        "saved, checkpoint-5 is intact: free space and run the stage again to resume from it"], full.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-5"]
    assert checksum_problem(ckpts / "checkpoint-5") is None and (ckpts / "checkpoint-5" / CHECKSUMS).is_file()
    assert not model.exists()

    # an older model in place; the disk fills up after the last checkpoint (step 12, the end of training),
    # before the final model is saved: the old one is untouched
    shutil.copytree(straight / "runs/tiny/models/teacher", model)
    (model / "OLD").write_text("the previous model\n")
    before = tree_hash(model)
    full = _kd_stage(on_server, "train_teacher", **{DISK_FULL_AFTER_CHECKPOINT_ENV: "models/teacher:12"})
    assert full.returncode == 74, full.stderr[-3000:]
    assert _error_lines(full.stderr) == ["error: runs/tiny/models/teacher: cannot write (File too large); the "
                                         "previous output there is intact"], full.stderr[-3000:]
    assert tree_hash(model) == before
    assert [p.name for p in model.parent.iterdir() if p.name.startswith(".teacher.")] == []  # no temporary folder
    assert last_complete_checkpoint(ckpts).name == "checkpoint-12"

    run_stage("train_teacher", cfg)  # space again: resumes from checkpoint-12, saves the final model
    assert not (model / "OLD").exists() and not ckpts.exists()
    a, b = _teacher_weights(straight), _teacher_weights(on_server)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


_WRITERS = r"""
import json, resource, signal, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kd_core.errors import WriteFailed, exit_code
from kd_core.io import atomic_dir, write_json_atomic

root = Path(sys.argv[1])
writers = {
    "metrics": lambda: write_json_atomic(root / "metrics/fkl.json", {"rougeL": "9" * 20000}),
    "cache": lambda: save_file({"top": torch.zeros(20000)}, str(Path(tmp) / "top_k.safetensors")),
    "optimizer": lambda: torch.save({"state": torch.zeros(20000)}, Path(tmp) / "optimizer.pt"),
}
folders = {"metrics": None, "cache": root / "teacher_cache/fkl", "optimizer": root / "models/teacher"}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
out = {}
for name, write in writers.items():
    try:
        if folders[name] is None:
            write()
        else:
            with atomic_dir(folders[name]) as tmp:
                write()
        out[name] = "written"
    except WriteFailed as err:
        out[name] = [str(err), exit_code(err)]
print(json.dumps(out))
"""


def test_failed_writes_name_the_path_and_leave_the_previous_output(tmp_path):
    """The writers of metrics (a file) and of the teacher cache and models (a folder: safetensors, torch.save)
    under a full disk: `WriteFailed` naming the output, exit status 74, the previous output byte for byte."""
    old = {"metrics/fkl.json": '{"rougeL": 1.0}\n', "teacher_cache/fkl/top_k.safetensors": "old cache",
           "models/teacher/optimizer.pt": "old optimizer"}
    for name, text in old.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = subprocess.run([sys.executable, "-c", _WRITERS, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    reasons = json.loads(out.stdout.strip().splitlines()[-1])
    for name, path in [("metrics", "metrics/fkl.json"), ("cache", "teacher_cache/fkl"),
                       ("optimizer", "models/teacher")]:
        message, status = reasons[name]
        assert message.startswith(f"{tmp_path / path}: cannot write (") and status == 74, reasons
        assert message.endswith("; the previous output there is intact") and "\n" not in message
    assert "File too large" in reasons["metrics"][0] and "File too large" in reasons["cache"][0]
    for name, text in old.items():
        assert (tmp_path / name).read_text() == text
    assert [p for p in tmp_path.rglob(".*")] == []  # no temporary file or folder left


# --------------------------------------------------------------------------------------------- 3. damaged files
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from kd_core.methods import get_method
    from kd_core.training.trainer import train
    from tests.method_harness import Interrupted, interrupt_at, tiny_setup

    setup = tiny_setup()
    cfg = TrainingConfig(max_steps=10, save_steps=3, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0,
                         logging_steps=10)

    def run(out_dir: Path, stop_at: int | None = None):
        method = get_method("sft")(None)
        student = setup.student(seed=1)
        if stop_at is not None:
            interrupt_at(method, stop_at)
        try:
            train(student, setup.train_set, setup.tokenizer, cfg, out_dir, method=method, seed=0, save=False)
        except Interrupted:
            return None
        return student

    straight = run(tmp_path / "straight" / "s")
    assert run(tmp_path / "resumed" / "s", stop_at=7) is None
    ckpts = tmp_path / "resumed" / ".s-checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    weights = ckpts / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that lost the end

    with caplog.at_level("WARNING", logger="kd"):
        resumed = run(tmp_path / "resumed" / "s")
    [warning] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert warning.startswith(f"checkpoint {ckpts / 'checkpoint-6'} is damaged: {weights}: truncated or extended (")
    assert warning.endswith("; removed, resuming from checkpoint-3")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_checksums_find_a_corrupted_byte_and_a_missing_file(tmp_path):
    from kd_core.io import write_checksums

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abcdef")
    (tmp_path / "sub" / "b.bin").write_bytes(b"xyz")
    write_checksums(tmp_path)
    assert checksum_problem(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"abcdeF")  # same size, one byte flipped
    assert checksum_problem(tmp_path) == f"{tmp_path / 'a.bin'}: corrupted (sha256 differs from the one recorded " \
                                         "when it was written)"
    (tmp_path / "a.bin").write_bytes(b"abcdef")
    (tmp_path / "sub" / "b.bin").unlink()
    assert checksum_problem(tmp_path) == f"{tmp_path / 'sub' / 'b.bin'}: missing"
    assert checksum_problem(tmp_path / "sub") is None  # no checksums: nothing to verify (written before them)


def test_corrupted_teacher_cache_shard_is_named_and_rebuilt(project, caplog):
    from kd_core.teachers.cache import TeacherLogitCache
    from kd_core.teachers.cache_key import TENSORS
    from kd_core.run import load_run_tokenizer, load_train_set
    from kd_core.stages.cache_teacher import cache_teacher

    p = tiny_params()
    p["teacher"]["training"] = dict(TINY_TRAINING, max_steps=2)
    p["students"] = {"cached": {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl",
                                "model": TINY_MODEL, "training": TINY_TRAINING,
                                "teacher_cache": {"enabled": True, "top_k": 8}}}
    cfg = load_config(write_params(project, p))
    paths = RunPaths.of(cfg)
    for stage in ("prepare", "train_teacher"):
        run_stage(stage, cfg)
    assert cache_teacher(cfg, paths, "cached")["source"] == "built"
    shard = paths.teacher_cache("cached") / TENSORS
    good = shard.read_bytes()
    middle = len(good) // 2
    shard.write_bytes(good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1:])  # one flipped byte

    tokenizer = load_run_tokenizer(paths)
    ds, _ = load_train_set(cfg, paths, tokenizer, "train")
    with pytest.raises(CacheError) as err:
        TeacherLogitCache(paths.teacher_cache("cached"), ds)
    assert str(err.value) == (f"teacher cache damaged: {shard}: corrupted (sha256 differs from the one recorded when "
                              "it was written); run `kd stage cache_teacher` to rebuild it")

    with caplog.at_level("WARNING", logger="kd"):
        assert cache_teacher(cfg, paths, "cached")["source"] == "built"
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] == [
        f"teacher cache of cached is damaged: {shard}: corrupted (sha256 differs from the one recorded when it was "
        "written): rebuilding it"]
    assert shard.read_bytes() == good  # the same teacher, the same rows
    assert cache_teacher(cfg, paths, "cached")["source"] == "current"
