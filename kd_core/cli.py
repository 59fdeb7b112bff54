"""`kd`: the command line. `kd run` (the whole Prefect flow), `kd stage NAME` (one stage, as DVC calls it),
`kd compare`, `kd validate`, `kd serve` (a scheduled deployment), `kd dvc-yaml` (dvc.yaml from the stages).

Bad input exits with status 2 and one line per problem on stderr, each naming the key, file or line; the exit
status of every error of ours comes from `kd_core.errors`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

import kd_core  # noqa: F401  (applies the offline defaults before the stack is imported)
from kd_core.config import PipelineConfig, load_config
from kd_core.config.load import yaml_value
from kd_core.errors import ConfigError, exit_code, is_reported
from kd_core.pipeline.launcher import print_error_line
from kd_core.stages import STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _overrides(sets: list[str] | None) -> dict:
    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. --set students.fkl.method=kd)")
        try:
            out[key] = yaml_value(value)  # as params.yaml reads it (1e-3 is a number)
        except yaml.YAMLError as err:  # (a mapping with a key given twice too: DuplicateKeys)
            problem = str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
    return out


def _fail(err: BaseException) -> None:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # (KeyError's str() quotes it)
    for line in str(message).splitlines() or [type(err).__name__]:
        typer.echo(f"error: {line}", err=True)
    print_error_line(err, str(message))  # KD_LAUNCHED=1 (a flow launched this `kd`): a machine-readable last line
    raise typer.Exit(exit_code(err))


@contextlib.contextmanager
def _reported():
    """Errors of ours and bad input: one line per message line, the exit status of `kd_core.errors`."""
    try:
        yield
    except Exception as err:
        if not is_reported(err):
            raise
        _fail(err)


def _load(params: Path, sets: list[str] | None) -> PipelineConfig:
    with _reported():
        return load_config(params, _overrides(sets))


@app.callback()
def _launcher(local_rank: Optional[int] = typer.Option(None, "--local_rank", hidden=True,
                                                      help="appended by the `deepspeed` launcher")) -> None:
    """Accept the `--local_rank=N` that the `deepspeed` launcher puts before the command; the launcher also
    sets LOCAL_RANK / RANK / WORLD_SIZE, which is what the Trainer reads."""


ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="the params file")
SetOpt = typer.Option(None, "--set", "-S", help="override a key, e.g. -S teacher.training.epochs=1 (repeatable)")


@app.command()
def validate(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Validate params.yaml and print the resolved configuration."""
    from kd_core.pipeline.dvc import local_data_files, untracked_inputs

    cfg = _load(params, set_)
    missing = [f"{params}: {key}: {path!r}: file not found" for key, path in local_data_files(cfg)
               if not Path(path).is_file()]
    if missing:  # known before anything runs (`prepare` says the same); the other commands may run without data
        _fail(ConfigError("\n".join(missing)))
    from kd_core.pipeline.cluster.check import cluster_problems

    if problems := cluster_problems(cfg):  # execution.engine ray: the cluster answers, its nodes hold the workers
        _fail(ConfigError("\n".join(f"{params}: {line}" for line in problems)))
    for line in untracked_inputs(cfg):
        typer.echo(f"warning: {params}: {line}", err=True)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command()
def stage(name: str = typer.Argument(..., help=" | ".join(STAGES)),
          model: Optional[str] = typer.Option(None, "--model", "--student", "-m",
                                              help="the student, model or transfer set of a per-model stage"),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run one stage (this is what dvc.yaml calls)."""
    from kd_core.pipeline.one_stage import run_stage
    from kd_core.progress import stage_bar

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _load(params, set_)
    from kd_core.training.interrupts import on_sigterm

    on_sigterm()  # SIGTERM: a checkpoint at the next training step, exit 143 (kd_core/training/interrupts.py)
    with _reported(), stage_bar(f"{name} {model}" if model else name):  # one progress bar, on a terminal
        result = run_stage(name, cfg, model)
    if name == "compare":
        print_table(result)
    else:
        typer.echo(json.dumps(result, indent=2, default=str)[:4000])
    _leave_process_group()
    _exit_now()


def _leave_process_group() -> None:
    """In a distributed launch, every rank waits for the others and destroys the process group before exiting:
    left to the interpreter's teardown, gloo's threads could abort a rank ("terminate called without an active
    exception", SIGABRT) after its work was done, and the launcher then reports the launch as failed."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _exit_now() -> None:
    """End a `kd stage` process that has finished without the interpreter's teardown of torch, transformers and
    MLflow (about 2 s a process; DVC runs one per stage): non-daemon threads are joined and the exit handlers
    run (logging, MLflow) as at a normal exit, output is flushed, then the process ends with status 0. Only in the
    `kd` command itself (not in an in-process test runner). A rank of a distributed launch (WORLD_SIZE > 1) ends
    this way too, whatever script the launcher started, after `_leave_process_group`: the C++ destructors that the
    teardown runs could still abort it (a gloo thread left joinable: "terminate called without an active
    exception", SIGABRT, seen under load with DeepSpeed ZeRO-3)."""
    if Path(sys.argv[0]).name != "kd" and int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        return
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run the whole pipeline as a Prefect flow (Prefect's temporary local server unless PREFECT_API_URL is set)."""
    from kd_core.training.interrupts import on_sigterm

    cfg = _load(params, set_)  # validate before starting anything
    on_sigterm()  # SIGTERM (Prefect's cancel): the running training stage checkpoints and stops, exit 143
    from flows.pipeline import kd_pipeline
    from kd_core.pipeline.prefect_server import die_with_this_process

    die_with_this_process()  # Prefect's temporary server (no PREFECT_API_URL) ends with this process, even killed
    with _reported():
        result = kd_pipeline(params_path=str(params), overrides=_overrides(set_))
    print_summary(result, cfg.tracking.registered_model)


def print_summary(result: dict, registered_model: str) -> None:
    """After `kd run`: the table, the champion, where everything is, and UI commands that work as printed (the
    venv's own `mlflow` / `prefect`, the project's Prefect home)."""
    from kd_core.pipeline import console

    print_table(result["compare"])
    mlflow_ui = result.get("mlflow_run") or console.mlflow_ui(result["tracking_uri"])
    prefect_ui = console.prefect_ui((result.get("flow_run") or {}).get("id"))
    rows = [("champion:", console.champion(result, registered_model)), ("run folder:", result["run_dir"]),
            ("report:", result["compare"]["markdown"]), ("plot:", result["compare"]["plot"]),
            ("MLflow store:", result["tracking_uri"])]
    for name, ui in (("MLflow UI:", mlflow_ui), ("Prefect UI:", prefect_ui)):
        rows += [(name, ui["command"]), ("", f"then open {ui['url']}")] if ui.get("command") else [(name, ui["url"])]
    lines = [""] + [f"{label:<17}{text}" for label, text in rows]
    typer.echo("\n".join(lines))


@app.command()
def compare(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Table of the registered versions in MLflow (any tracking URI), with report and plot."""
    from kd_core.pipeline.one_stage import run_stage
    from kd_core.tracking.store import sqlite_file, tracking_uri

    cfg = _load(params, set_)
    with _reported():
        uri = tracking_uri(cfg)
        if uri.startswith("sqlite:///") and not sqlite_file(uri).expanduser().is_file():
            raise LookupError(f"no registered versions of {cfg.tracking.registered_model!r}: no MLflow store at {uri} "
                              f"(run the pipeline first, or set MLFLOW_TRACKING_URI)")  # (and none is created here)
        result = run_stage("compare", cfg)
    print_table(result)


@app.command()
def serve(params: Path = ParamsOpt, cron: str = typer.Option("0 3 * * *", help="cron schedule"),
          name: str = typer.Option("kd-pipeline-scheduled", help="deployment name")) -> None:
    """Serve the flow as a scheduled deployment (needs a Prefect server: PREFECT_API_URL)."""
    _load(params, None)
    from flows.pipeline import kd_pipeline

    kd_pipeline.serve(name=name, cron=cron, parameters={"params_path": str(params)})


@app.command()
def lineage(spec: str = typer.Argument(..., help="MODEL@alias, MODEL:version or MODEL (newest), e.g. kd-student@champion"),
            params: Path = ParamsOpt) -> None:
    """Where a registered version came from: data and model hashes (DVC), params, code revision, teacher chain."""
    from kd_core.tracking import registry, store

    cfg = _load(params, None)
    with _reported():
        store.setup(cfg)
        v = registry.get_version(spec)
    t = v["tags"]
    typer.echo(f"{v['name']} v{v['version']}" + (f" ({', '.join(v['aliases'])})" if v["aliases"] else ""))
    chain = [t.get("kd.model", "?")]
    teacher = t.get("kd.teacher", "")
    while teacher:  # follow the teacher-assistant chain through the versions registered by the same run
        chain.append(teacher)
        teacher = "" if teacher == t.get("kd.root_teacher") else _teacher_of(cfg, teacher, t.get("kd.params_hash"))
    typer.echo(f"  model:        {t.get('kd.model')} ({t.get('kd.method')}{', ' + t['kd.divergence'] if t.get('kd.divergence') else ''})")
    typer.echo(f"  teacher chain: {' <- '.join(reversed(chain))}")
    typer.echo(f"  params hash:  {t.get('kd.params_hash')}   data version: {t.get('kd.data_version')}")
    typer.echo(f"  code:         git {t.get('kd.git_commit') or 'unknown'}" + (" (dirty tree)" if t.get("kd.git_dirty") == "true" else ""))
    typer.echo(f"  run folder:   {t.get('kd.run_dir')}   weights hash: {t.get('kd.model_hash')}")
    dvc = {k.removeprefix("kd.dvc."): h for k, h in sorted(t.items()) if k.startswith("kd.dvc.")}
    typer.echo("  DVC:" + ("" if dvc else " not recorded (the run was not versioned with DVC)"))
    for key, h in dvc.items():
        typer.echo(f"    {key}: {h}")


def _teacher_of(cfg: PipelineConfig, model: str, params_hash: str | None) -> str:
    from kd_core.tracking import registry

    for row in registry.version_rows(cfg.tracking.registered_model):
        if row["tags"].get("kd.model") == model and row["tags"].get("kd.params_hash") == params_hash:
            return row["tags"].get("kd.teacher", "")
    return ""


@app.command()
def checkout(spec: str = typer.Argument(..., help="MODEL@alias, MODEL:version or MODEL"), params: Path = ParamsOpt) -> None:
    """Restore a registered version's data splits and model folder into the run folder (DVC cache or remote)."""
    from kd_core.pipeline import dvc
    from kd_core.tracking import registry, runs, store

    cfg = _load(params, None)
    with _reported():
        store.setup(cfg)
        v = registry.get_version(spec)
        with runs.downloaded_artifact(v["run_id"], "lineage/dvc.lock") as lock:
            if lock is None:
                raise LookupError(f"{spec}: version {v['version']} was not versioned with DVC (no lineage/dvc.lock)")
            lock_text = lock.read_text(encoding="utf-8")
        name = v["tags"]["kd.model"]
        stage = "train_teacher" if v["tags"].get("kd.role") == "teacher" else f"finetune@{name}"
        restored = dvc.checkout(Path.cwd(), lock_text, ["prepare", stage])
    typer.echo(f"{v['name']} v{v['version']}: restored {len(restored)} path(s)")
    for path in restored:
        typer.echo(f"  {path}")


@app.command("dvc-yaml")
def dvc_yaml(check: bool = typer.Option(False, "--check", help="only check: exit 1 when dvc.yaml is out of date")) -> None:
    """Write dvc.yaml from the stage declarations (kd_core/stages/__init__.py)."""
    from kd_core.pipeline import dvcfile

    if check:
        current = dvcfile.ROOT / "dvc.yaml"
        if not current.is_file() or current.read_text(encoding="utf-8") != dvcfile.render():
            typer.echo("dvc.yaml differs from the stage declarations: run `kd dvc-yaml`", err=True)
            raise typer.Exit(1)
        return
    typer.echo("dvc.yaml " + ("written" if dvcfile.write() else "is up to date"))


def print_table(result: dict) -> None:
    """The registered versions in their console form (`compare.table(console=True)`: within 120 columns; the
    report, reports/compare.md, has every column) on the champion metric's eval set, then each model against SFT."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from kd_core.evaluation.compare import table as version_table

    eval_set = result.get("paired_set") or "test"
    table = Table(title=f"registered models ({eval_set} prompts; every column in the report)")
    header, cells = version_table(result["rows"], console=True, eval_set=eval_set)
    for col in header:
        table.add_column(col)
    for row in cells:
        table.add_row(*row)
    console = Console()  # a terminal: its width (the table wraps its cells to fit)
    if not console.is_terminal and "COLUMNS" not in os.environ:  # a pipe or a file: the table's own width
        console = Console(width=Measurement.get(console, console.options.update_width(1000), table).maximum)
    console.print(table)
    for p in result.get("paired_vs_sft", []):
        typer.echo(f"  {p['model']:>12} vs {p['vs']}: ΔROUGE-L {p['mean_diff']:+.2f} "
                   f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}], p = {p['p_value']:.3f} over {p['n_prompts']} {p.get('set', 'test')} prompts")


def main() -> None:  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
