"""Training stages run by the flow as launched processes: a stage whose training section sets `launcher`
(`teacher.training.launcher` for train_teacher, `students.<key>.training.launcher` for distill and finetune)
runs as `torchrun ... kd stage NAME --model KEY` (or under DeepSpeed's `deepspeed` launcher), its output
streamed line by line into the Prefect task's log, and its failure raised in the flow as the error the stage
would have raised in process (same class, message, exit status and retry rule: `kd_core.errors`).

The child reports its error on a last stderr line that `kd` prints when KD_LAUNCHED=1 (`print_error_line`,
called from the CLI's error path): `kd-error: {"class": "DataError", "exit_code": 2, "message": "...", "rank": 0}`.
A launch killed by a signal (out of memory, preemption) is `Transient` (the flow retries it); one that dies
without that line (a crash with a traceback) is a RuntimeError, as the same crash in process would be.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from kd_core import errors
from kd_core.training.interrupts import forwarding_sigterm

LAUNCHED_ENV = "KD_LAUNCHED"
ERROR_PREFIX = "kd-error: "
# the kd-error line, possibly behind torchrun's `--tee` prefix ("[default1]:")
_ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:)?" + re.escape(ERROR_PREFIX) + r"(\{.*\})\s*$")
# torchrun's failure summary for a worker killed by a signal (it exits 1 itself), and DeepSpeed's launcher's
_KILLED_WORKER = re.compile(r"exitcode\s*:\s*-(9|15)\b|Signal (9|15) \(SIG(KILL|TERM)\)"
                            r"|exits with return code = -(9|15)\b")
# SIGKILL / SIGTERM as Popen (negative), a shell (128 + n) or DeepSpeed's launcher (sys.exit(-n): 256 - n) reports them
KILL_CODES = {-9, -15, 137, 143, 247, 241}
_EXCEPTION_LINE = re.compile(r"^(?:\[[^\]]*\]:)?\s*[\w.]*(?:Error|Exception|Interrupt)(?::|$)")
TAIL_LINES = 80


# ------------------------------------------------------------------------------------------- which stages
def launcher_for(stage_name: str, cfg, key: str | None):
    """The `LauncherConfig` a training stage runs under, or None: in the flow's process (not a training stage,
    no `launcher` set, an unknown key (the in-process run reports it), or a stage that trains nothing:
    `teacher.train: false`, `finetune.enabled: false`)."""
    if stage_name == "train_teacher":
        return cfg.teacher.training.launcher if cfg.teacher.train else None
    if stage_name in ("distill", "finetune") and key in cfg.students:
        student = cfg.students[key]
        if stage_name == "finetune" and not student.finetune.enabled:
            return None
        return student.training.launcher
    return None


def launched_result(stage_name: str, cfg, key: str | None) -> dict:
    """What a launched training stage returns (rank 0 wrote it): the stage's `train_info` JSON; for a stage run
    in a process of its own (`run_as_process`): an evaluation's metrics, else {} (what the flow reads of it)."""
    from kd_core.run import RunPaths

    paths = RunPaths.of(cfg)
    if stage_name == "evaluate":
        return json.loads(paths.metrics(key).read_text(encoding="utf-8"))
    if stage_name not in ("train_teacher", "distill", "finetune"):
        return {}
    name = {"train_teacher": cfg.teacher.name, "distill": f"{key}.distill", "finetune": key}[stage_name]
    path = paths.train_info(name)
    if not path.is_file():
        raise RuntimeError(f"{stage_name}: the launched stage ended without writing {path}")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- the command
def _bin(name: str) -> str:
    """A console script of this environment (the venv's bin folder, beside the running python), else PATH's."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else name


def _override_args(overrides: dict | None) -> list[str]:
    """The flow's overrides as `-S key=value`; values as JSON, which `kd`'s YAML parsing reads back unchanged."""
    out: list[str] = []
    for dotted, value in (overrides or {}).items():
        out += ["-S", f"{dotted}={json.dumps(value)}"]
    return out


def launch_command(stage: str, key: str | None, params_path: str | os.PathLike, overrides: dict | None,
                   launcher_cfg) -> list[str]:
    """The launcher's command line for one stage: `torchrun --nproc_per_node N --master_addr A --master_port P
    [extra] kd stage STAGE [--model KEY] --params PARAMS [-S k=v ...]`, or `deepspeed --num_gpus N --master_addr A
    --master_port P [extra] kd ...` (DeepSpeed's launcher on CPU: `--num_gpus N` starts N processes, gloo between
    them; with `--hostfile` in `extra`, it starts the other nodes' processes itself over ssh)."""
    lc = launcher_cfg
    if lc.kind == "torchrun":
        cmd = [_bin("torchrun"), "--nproc_per_node", str(lc.nproc_per_node), "--master_addr", lc.master_addr,
               "--master_port", str(lc.master_port)]
    elif lc.kind == "deepspeed":
        cmd = [_bin("deepspeed"), "--num_gpus", str(lc.nproc_per_node), "--master_addr", lc.master_addr,
               "--master_port", str(lc.master_port)]
    else:
        raise ValueError(f"launcher.kind: unknown launcher {lc.kind!r} (allowed: torchrun, deepspeed)")
    return cmd + list(lc.extra_args) + stage_command(stage, key, params_path, overrides)


def stage_command(stage: str, key: str | None, params_path: str | os.PathLike, overrides: dict | None) -> list[str]:
    """`kd stage STAGE [--model KEY] --params PARAMS [-S k=v ...]`: one stage in a process of its own."""
    cmd = [_bin("kd"), "stage", stage]
    if key is not None:
        cmd += ["--model", key]
    return cmd + ["--params", str(params_path)] + _override_args(overrides)


# ------------------------------------------------------------------------------------------- errors
def print_error_line(err: BaseException, message: str) -> None:
    """In a launched `kd` (KD_LAUNCHED=1): the error as one machine-readable last line on stderr."""
    if os.environ.get(LAUNCHED_ENV) != "1":
        return
    record = {"class": type(err).__name__, "exit_code": errors.exit_code(err), "message": message,
              "rank": int(os.environ.get("RANK", "0") or 0)}
    print(ERROR_PREFIX + json.dumps(record), file=sys.stderr, flush=True)


def parse_error_line(line: str) -> dict | None:
    """The record of a kd-error line (behind a launcher's rank prefix or not), else None."""
    match = _ERROR_LINE.match(line.rstrip("\r\n"))
    if not match:
        return None
    try:
        record = json.loads(match.group(1))
    except ValueError:
        return None
    return record if isinstance(record, dict) and "message" in record else None


def error_from_record(record: dict) -> BaseException:
    """The exception a kd-error record names: a class of `kd_core.errors`, else one of Python's (a KeyError,
    a ValueError: what the stage raised), else by exit status: UserError (2) or KDError."""
    name, message = str(record.get("class", "")), str(record.get("message", ""))
    cls: Any = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KDError)):
        cls = getattr(builtins, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = errors.UserError if record.get("exit_code") == 2 else errors.KDError
    try:
        return cls(message)
    except TypeError:  # an exception class with another signature
        return (errors.UserError if record.get("exit_code") == 2 else errors.KDError)(message)


def launch_error(returncode: int, records: list[dict], tail: list[str], what: str) -> BaseException:
    """The error of a failed launch: the child's kd-error (rank 0's when several ranks reported), else a
    Transient for a process killed by a signal, else a RuntimeError with the end of the output."""
    if records:
        record = next((r for r in records if r.get("rank", 0) == 0), records[0])
        return error_from_record(record)
    # torchrun lists the workers it stopped itself (SIGTERM) too: only its root cause counts
    root = max((i for i, line in enumerate(tail) if "Root Cause" in line), default=0)
    if returncode in KILL_CODES or any(_KILLED_WORKER.search(line) for line in tail[root:]):
        return errors.Transient(f"{what}: killed (exit status {returncode}; out of memory or preempted?)")
    last = next((line for line in reversed(tail) if _EXCEPTION_LINE.search(line) and "ChildFailedError" not in line),
                next((line for line in reversed(tail) if line.strip()), ""))  # the worker's exception, not torchrun's
    return RuntimeError(f"{what}: exited with status {returncode}" + (f": {last.strip()}" if last else ""))


# ------------------------------------------------------------------------------------------- running it
def run_launched(stage: str, key: str | None, params_path: str | os.PathLike, overrides: dict | None, launcher_cfg,
                 log) -> None:
    """Run the stage under its launcher in the current folder; every output line goes to `log.info` as it
    comes. A non-zero exit raises the stage's own error (see `launch_error`)."""
    cmd = launch_command(stage, key, params_path, overrides, launcher_cfg)
    run_command(cmd, f"{stage}" + (f" --model {key}" if key else "") + f" under {launcher_cfg.kind}", log)


def run_as_process(stage: str, key: str | None, params_path: str | os.PathLike, overrides: dict | None, log) -> None:
    """Run the stage as `kd stage` in a process of its own (`stage_command`), as `run_launched` runs a launch: the
    flow does this for the stages it runs side by side (`orchestration.max_parallel_students` > 1): threads of
    one process share torch's global RNG (sampling, data order, initialisation) and transformers' global loading
    state, so stages running together in threads do not give what they give one after another."""
    run_command(stage_command(stage, key, params_path, overrides), f"{stage}" + (f" --model {key}" if key else ""),
                log)


def run_command(cmd: list[str], what: str, log) -> None:
    """Run a `kd stage` command line (under a launcher or not) in the current folder; every output line goes to
    `log.info` as it comes. A non-zero exit raises the stage's own error (see `launch_error`)."""
    log.info("launching: %s", shlex.join(cmd))
    env = dict(os.environ, **{LAUNCHED_ENV: "1", "PYTHONUNBUFFERED": "1"})
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    records: list[dict] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, text=True, errors="replace", bufsize=1)
    with forwarding_sigterm(proc):  # a cancel (SIGTERM to the flow) reaches the stage process too
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if not line.strip():  # (progress bars redraw with a bare carriage return: no blank log records)
                    continue
                record = parse_error_line(line)
                if record is not None:
                    records.append(record)
                tail.append(line)
                log.info("%s", line)
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # the task was interrupted: stop the launcher (it stops its workers)
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if returncode != 0:
        raise launch_error(returncode, records, list(tail), what)
    log.info("%s: finished", what)
