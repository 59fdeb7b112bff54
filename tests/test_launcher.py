"""Training stages launched from the flow (`training.launcher`, kd_core/pipeline/launcher.py): the launcher's command
line, the child's error mapped back to the in-process error class, and the flow running a student's
distillation as two gloo processes under `torchrun`."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_core.config import ConfigError, load_config, parse_config
from kd_core.config.schema import LauncherConfig
from kd_core.errors import DataError, KDError, MissingInput, Transient, UserError, exit_code, is_retryable
from kd_core.pipeline import launcher
from kd_core.pipeline.launcher import (error_from_record, launch_command, launcher_for, parse_error_line,
                                      print_error_line, run_launched)
from tests.conftest import free_port, tiny_params, write_params

BIN = Path(sys.executable).parent


class ListLog:
    """A logger-like sink for the streamed lines (and a tee to another logger)."""

    def __init__(self, forward=None):
        self.lines: list[str] = []
        self.forward = forward

    def info(self, msg, *args):
        self.lines.append(msg % args if args else msg)
        if self.forward is not None:
            self.forward.info(msg, *args)


def _with_launcher(params: dict, student: str, launcher_cfg: dict, **training) -> dict:
    # tiny_params() shares one training dict between the teacher and the students: give this one its own
    params["students"][student]["training"] = dict(params["students"][student]["training"], launcher=launcher_cfg,
                                                   **training)
    return params


# ------------------------------------------------------------------------------------------- config
def test_launcher_config_defaults_and_which_stages():
    params = _with_launcher(tiny_params(), "fkl", {"kind": "torchrun", "nproc_per_node": 2})
    cfg = parse_config(params)
    lc = cfg.student("fkl").training.launcher
    assert (lc.kind, lc.nproc_per_node, lc.master_addr, lc.master_port, lc.extra_args) == \
        ("torchrun", 2, "127.0.0.1", 29500, [])
    assert cfg.student("sft").training.launcher is None and cfg.teacher.training.launcher is None
    assert launcher_for("distill", cfg, "fkl") is lc
    assert launcher_for("finetune", cfg, "fkl") is lc  # fkl fine-tunes (finetune.enabled)
    assert launcher_for("distill", cfg, "sft") is None
    assert launcher_for("train_teacher", cfg, None) is None
    for stage, key in [("prepare", None), ("cache_teacher", "fkl"), ("evaluate", "fkl"), ("distill", "nope")]:
        assert launcher_for(stage, cfg, key) is None

    params["students"]["fkl"]["finetune"]["enabled"] = False  # nothing to train: the link runs in process
    params["teacher"]["training"] = dict(params["teacher"]["training"],
                                         launcher={"kind": "deepspeed", "nproc_per_node": 4})
    cfg = parse_config(params)
    assert launcher_for("finetune", cfg, "fkl") is None
    assert launcher_for("train_teacher", cfg, None).kind == "deepspeed"
    params["teacher"]["train"] = False
    assert launcher_for("train_teacher", parse_config(params), None) is None


@pytest.mark.parametrize("bad, expected", [
    ({"kind": "torchrun", "nproc_per_node": 2, "nprocs": 2}, "students.fkl.training.launcher.nprocs: unknown key"),
    ({"kind": "mpirun", "nproc_per_node": 2}, "students.fkl.training.launcher.kind: "),
    ({"kind": "torchrun", "nproc_per_node": 0}, "students.fkl.training.launcher.nproc_per_node: "),
    ({"kind": "torchrun"}, "students.fkl.training.launcher.nproc_per_node: Field required"),
    ({"kind": "torchrun", "nproc_per_node": 2, "nnodes": 2, "node_rank": 1},
     "students.fkl.training.launcher.nnodes: the per-node mode is gone; several nodes: execution.engine: ray"),
    ({"kind": "torchrun", "nproc_per_node": 2, "master_port": 70000}, "students.fkl.training.launcher.master_port: "),
])
def test_bad_launcher_config_names_the_key(bad, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(_with_launcher(tiny_params(), "fkl", bad))
    assert expected in str(err.value)


def test_launcher_set_from_the_command_line(tmp_path):
    path = write_params(tmp_path, tiny_params())
    cfg = load_config(path, {"students.fkl.training.launcher": {"kind": "torchrun", "nproc_per_node": 2}})
    assert cfg.student("fkl").training.launcher.nproc_per_node == 2


# ------------------------------------------------------------------------------------------- command line
def test_torchrun_command():
    lc = LauncherConfig(kind="torchrun", nproc_per_node=2, extra_args=["--tee", "3"])
    cmd = launch_command("distill", "fkl", "params.yaml", {"students.fkl.training.max_steps": 3,
                                                          "students.fkl.method": "kd", "evaluation.limit": None}, lc)
    assert cmd == [str(BIN / "torchrun"), "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", "29500", "--tee", "3",
                   str(BIN / "kd"), "stage", "distill", "--model", "fkl", "--params", "params.yaml",
                   "-S", "students.fkl.training.max_steps=3", "-S", 'students.fkl.method="kd"',
                   "-S", "evaluation.limit=null"]
    other = LauncherConfig(kind="torchrun", nproc_per_node=8, master_addr="10.0.0.1", master_port=29600)
    cmd = launch_command("train_teacher", None, Path("p.yaml"), None, other)
    assert cmd[1:7] == ["--nproc_per_node", "8", "--master_addr", "10.0.0.1", "--master_port", "29600"]
    assert cmd[7:] == [str(BIN / "kd"), "stage", "train_teacher", "--params", "p.yaml"]  # no --model


def test_overrides_reach_the_child_unchanged():
    """`-S key=value` is read back with YAML by `kd`: the JSON written by launch_command must round-trip."""
    from kd_core.cli import _overrides

    overrides = {"a.s": "kd", "a.n": 3, "a.f": 0.5, "a.b": True, "a.none": None, "a.list": [1, "x"],
                 "a.map": {"k": "v: w"}, "a.str_num": "3", "a.yes": "yes"}
    cmd = launch_command("distill", "fkl", "p.yaml", overrides, LauncherConfig(kind="torchrun", nproc_per_node=1))
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    assert _overrides(sets) == overrides


def test_deepspeed_command():
    lc = LauncherConfig(kind="deepspeed", nproc_per_node=2, master_port=29601)
    cmd = launch_command("distill", "fkl", "params.yaml", None, lc)
    assert cmd == [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", "29601",
                   str(BIN / "kd"), "stage", "distill", "--model", "fkl", "--params", "params.yaml"]
    lc = LauncherConfig(kind="deepspeed", nproc_per_node=8, master_addr="10.0.0.1", extra_args=["--hostfile", "hosts"])
    cmd = launch_command("distill", "fkl", "params.yaml", None, lc)  # the hostfile's nodes: DeepSpeed reaches them
    assert cmd[:9] == [str(BIN / "deepspeed"), "--num_gpus", "8", "--master_addr", "10.0.0.1", "--master_port",
                       "29500", "--hostfile", "hosts"]


# ------------------------------------------------------------------------------------------- errors
def test_cli_prints_the_error_line_only_when_launched(tmp_path, monkeypatch):
    from kd_core.cli import app

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, tiny_params())
    args = ["stage", "distill", "--model", "nope", "--params", "params.yaml"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 2 and "kd-error" not in plain.output
    monkeypatch.setenv("KD_LAUNCHED", "1")
    monkeypatch.setenv("RANK", "1")
    launched = CliRunner().invoke(app, args)
    assert launched.exit_code == 2
    last = launched.stderr.strip().splitlines()[-1]
    record = parse_error_line(last)
    assert record == {"class": "KeyError", "exit_code": 2, "rank": 1,
                      "message": "stage 'distill': no student named 'nope' (allowed: sft, fkl)"}
    err = error_from_record(record)
    assert type(err) is KeyError and err.args[0] == record["message"] and exit_code(err) == 2


def test_error_records_map_back_to_their_classes(capsys, monkeypatch):
    monkeypatch.setenv("KD_LAUNCHED", "1")
    print_error_line(DataError("data.path: line 3: not JSON\nsecond line"), "data.path: line 3: not JSON\nsecond line")
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("kd-error: ")
    err = error_from_record(parse_error_line("[default0]:" + line))  # behind torchrun's --tee prefix too
    assert type(err) is DataError and str(err) == "data.path: line 3: not JSON\nsecond line"
    assert type(error_from_record({"class": "Weird", "exit_code": 1, "message": "m"})) is KDError
    assert type(error_from_record({"class": "Weird", "exit_code": 2, "message": "m"})) is UserError
    assert type(error_from_record({"class": "UnicodeDecodeError", "exit_code": 2, "message": "m"})) is UserError
    assert type(error_from_record({"class": "ValueError", "exit_code": 2, "message": "m"})) is ValueError
    assert parse_error_line("kd-error: not json") is None and parse_error_line("error: x") is None


FAKE_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    mode = sys.argv[1]
    print("step 1 of 3", flush=True)
    print("warming up", file=sys.stderr, flush=True)
    if mode == "data":
        print("error: data.path: line 3: not JSON", file=sys.stderr)
        print('kd-error: ' + json.dumps({"class": "DataError", "exit_code": 2, "message": "data.path: line 3: not JSON",
                                        "rank": 0}), file=sys.stderr)
        sys.exit(2)
    if mode == "ranks":  # rank 1 died of rank 0's failure; rank 0's error is the one reported
        print('kd-error: ' + json.dumps({"class": "KDError", "exit_code": 1, "message": "peer gone", "rank": 1}))
        print('kd-error: ' + json.dumps({"class": "MissingInput", "exit_code": 2, "message": "no teacher", "rank": 0}))
        sys.exit(1)
    if mode == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "137":
        sys.exit(137)
    if mode == "crash":
        raise RuntimeError("CUDA error: an illegal memory access")
""")


@pytest.mark.parametrize("mode, cls, message", [
    ("data", DataError, "data.path: line 3: not JSON"),
    ("ranks", MissingInput, "no teacher"),
    ("oom", Transient, "killed"),
    ("137", Transient, "killed"),
    ("crash", RuntimeError, "exited with status 1: RuntimeError: CUDA error: an illegal memory access"),
])
def test_a_failed_child_raises_the_in_process_error(tmp_path, monkeypatch, mode, cls, message):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(launcher, "launch_command", lambda *a: [sys.executable, str(script), mode])
    log = ListLog()
    with pytest.raises(cls) as err:
        run_launched("distill", "fkl", "params.yaml", None, LauncherConfig(kind="torchrun", nproc_per_node=2), log)
    assert type(err.value) is cls
    if cls in (Transient, RuntimeError):  # the message is ours: it names the stage and the exit status
        assert message in str(err.value) and "distill --model fkl under torchrun" in str(err.value)
    else:  # the child's message, as is
        assert str(err.value) == message
    assert "step 1 of 3" in log.lines and "warming up" in log.lines  # stdout and stderr, streamed
    assert is_retryable(err.value) == (cls in (Transient, RuntimeError))


TORCHRUN_REPORT = """\
[rank1]: RuntimeError: CUDA error: an illegal memory access
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
kd FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 19971)  (SIGTERM)
  traceback : Signal 15 (SIGTERM) received by PID 19971
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 19972)
  traceback : {traceback}
============================================================"""


def test_launcher_reports_without_a_kd_error_line():
    """A worker that crashed (torchrun then stops the others with SIGTERM: not a kill) is the in-process crash,
    a RuntimeError; a worker killed by a signal, as torchrun's root cause or DeepSpeed's launcher says, is
    Transient."""
    from kd_core.pipeline.launcher import launch_error

    crashed = TORCHRUN_REPORT.format(code=1, traceback="To enable traceback see: https://pytorch.org").splitlines()
    err = launch_error(1, [], crashed, "distill --model fkl under torchrun")
    assert type(err) is RuntimeError
    assert str(err) == ("distill --model fkl under torchrun: exited with status 1: "
                        "[rank1]: RuntimeError: CUDA error: an illegal memory access")
    killed = TORCHRUN_REPORT.format(code=-9, traceback="Signal 9 (SIGKILL) received by PID 19972").splitlines()
    assert type(launch_error(1, [], killed, "distill")) is Transient
    deepspeed = ["[INFO] [launch.py:336:sigkill_handler] ['python', 'kd'] exits with return code = -9"]
    assert type(launch_error(247, [], deepspeed, "distill")) is Transient
    assert "killed" in str(launch_error(-9, [], [], "distill"))


@pytest.mark.parametrize("kind", ["torchrun", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_a_child_failing_under_a_real_launcher(tmp_path, monkeypatch, kind):
    """torchrun exits 1 whatever its worker's status and adds its own report after the worker's lines, DeepSpeed's
    launcher logs its own lines around them: the kd-error line is still found (torchrun's `--tee` rank prefixes
    stripped). On CPU, both start the processes asked for (`--num_gpus 2`: two processes for DeepSpeed too)."""
    if kind == "deepspeed":
        pytest.importorskip("deepspeed")
    script = tmp_path / "kd"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], sys.argv[1:], flush=True)
        if os.environ["RANK"] == "0":
            print('kd-error: ' + json.dumps({"class": "PreflightError", "exit_code": 2, "message": "batch too big",
                                            "rank": 0}), file=sys.stderr, flush=True)
            sys.exit(2)
    """))
    real_bin = launcher._bin
    monkeypatch.setattr(launcher, "_bin", lambda name: str(script) if name == "kd" else real_bin(name))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lc = LauncherConfig(kind=kind, nproc_per_node=2, master_port=free_port(),
                        extra_args=["--tee", "3"] if kind == "torchrun" else [])
    log = ListLog()
    from kd_core.errors import PreflightError

    with pytest.raises(PreflightError, match="^batch too big$"):
        run_launched("distill", "fkl", "params.yaml", None, lc, log)
    started = [line for line in log.lines if "rank 0 of 2 [" in line and "'stage', 'distill', '--model', 'fkl'" in line]
    if kind == "torchrun":
        assert started and started[0].startswith("[default0]:rank 0 of 2"), log.lines
    else:  # DeepSpeed's launcher tears its workers down when one fails: a worker's own first line may not make it
        assert started or any("WORLD INFO DICT: {'localhost': [0, 1]}" in line for line in log.lines), log.lines


# ------------------------------------------------------------------------------------------- through the flow
@pytest.fixture(scope="module")
def harness(empty_stores):
    with empty_stores.prefect_harness():
        yield


def _launched_params(port: int) -> dict:
    params = tiny_params()
    del params["students"]["sft"]  # one student keeps the run short
    params["tracking"]["champion"] = {"metric": "val/ppl", "mode": "min"}
    params["students"]["fkl"]["finetune"]["enabled"] = False  # (a disabled finetune runs in process: a link)
    # batch 8 per process: the global batch of the single-process tiny run (16) over 2 processes
    return _with_launcher(params, "fkl", {"kind": "torchrun", "nproc_per_node": 2, "master_port": port,
                                          "extra_args": ["--tee", "3"]}, batch_size=8)


@pytest.mark.slow
def test_flow_task_fails_with_the_in_process_error(project, harness, monkeypatch):
    """distill launched before its inputs exist: the task fails with the error and message of in process."""
    from flows.pipeline import stage_task
    from kd_core.pipeline.one_stage import run_stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = write_params(project, _launched_params(free_port()))
    with pytest.raises(MissingInput) as in_process:
        run_stage("distill", load_config(path), "fkl")
    with pytest.raises(MissingInput) as launched:
        stage_task(stage="distill", node="distill@fkl", params_path=str(path), key="fkl")
    assert str(launched.value) == str(in_process.value)
    assert len(str(launched.value).splitlines()) == 1


@pytest.mark.slow
def test_flow_runs_a_student_as_two_torchrun_processes(project, harness, monkeypatch):
    from mlflow.tracking import MlflowClient

    import flows.pipeline as pipeline
    from kd_core.pipeline import execute

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    streamed: list[ListLog] = []
    real = execute.run_launched

    def capturing(stage, key, params_path, overrides, launcher_cfg, log):
        streamed.append(ListLog(forward=log))
        return real(stage, key, params_path, overrides, launcher_cfg, streamed[-1])

    monkeypatch.setattr(execute, "run_launched", capturing)
    params = _launched_params(free_port())
    path = write_params(project, params)
    result = pipeline.kd_pipeline(params_path=str(path))

    assert len(streamed) == 1  # distill@fkl only: the teacher and the (disabled) finetune ran in process
    lines = streamed[0].lines
    assert lines[0].startswith(f"launching: {BIN / 'torchrun'} --nproc_per_node 2 ")
    assert " stage distill --model fkl " in lines[0]
    ranks = {line.split(":", 1)[0] for line in lines if line.startswith("[default")}
    assert ranks == {"[default0]", "[default1]"}, lines[-20:]  # both ranks printed into the task's log

    info = json.loads((project / "runs/tiny/train_info/fkl.distill.json").read_text())
    assert info["steps"] == 6 and info["name"] == "fkl"
    assert set(result["registered"]["versions"]) == {"teacher", "fkl"}
    versions = MlflowClient().search_model_versions("name='kd-student'")
    assert [v.tags["kd.model"] for v in versions] == ["fkl"]
    distill_runs = [r for r in MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tiny").experiment_id])
                    if r.data.tags.get("kd.stage") == "distill"]
    assert len(distill_runs) == 1  # rank 0 alone tracked the launched stage
