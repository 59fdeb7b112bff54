"""`kd`: the command line. `kd run` (the whole Prefect flow), `kd stage NAME` (one stage, as DVC calls it),
`kd compare`, `kd validate`, `kd serve` (a scheduled deployment).

Bad input exits with status 2 and one line per problem on stderr, each naming the key, file or line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

import kd_core  # noqa: F401  (applies the offline defaults before the stack is imported)
from kd_core.config import ConfigError, PipelineConfig, load_config
from kd_core.preflight import PreflightError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, LookupError, PreflightError)


def _overrides(sets: list[str] | None) -> dict:
    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. --set students.fkl.method=kd)")
        out[key] = yaml.safe_load(value)
    return out


def _fail(err: BaseException) -> None:
    for line in str(err).splitlines() or [type(err).__name__]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _load(params: Path, sets: list[str] | None) -> PipelineConfig:
    try:
        return load_config(params, _overrides(sets))
    except ConfigError as err:
        _fail(err)


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
    cfg = _load(params, set_)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command()
def stage(name: str = typer.Argument(..., help="prepare | train_teacher | transfer | cache_teacher | distill | finetune | evaluate | register | compare"),
          model: Optional[str] = typer.Option(None, "--model", "--student", "-m",
                                              help="student or teacher name (transfer: the transfer set's name)"),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run one stage (this is what dvc.yaml calls)."""
    from kd_core.stages import STAGES, RunPaths

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _load(params, set_)
    if name not in STAGES:
        _fail(ValueError(f"unknown stage {name!r} (allowed: {', '.join(STAGES)})"))
    needs_model = name in ("transfer", "cache_teacher", "distill", "finetune", "evaluate")
    if needs_model and not model:
        _fail(ValueError(f"stage {name!r} needs --model"))
    try:
        if name in ("cache_teacher", "distill", "finetune") or (name == "evaluate" and model != cfg.teacher.name):
            cfg.student(model)  # fail early on an unknown name
        result = STAGES[name](cfg, RunPaths.of(cfg), model) if needs_model else STAGES[name](cfg, RunPaths.of(cfg))
    except KeyError as err:
        _fail(ValueError(err.args[0]))
    except USER_ERRORS as err:
        _fail(err)
    if name == "compare":
        print_table(result)
    else:
        typer.echo(json.dumps(result, indent=2, default=str)[:4000])


@app.command()
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run the whole pipeline as a Prefect flow (a temporary local Prefect server unless PREFECT_API_URL is set)."""
    _load(params, set_)  # validate before starting anything
    from flows.pipeline import kd_pipeline

    try:
        result = kd_pipeline(params_path=str(params), overrides=_overrides(set_))
    except USER_ERRORS as err:
        _fail(err)
    print_table(result["compare"])
    typer.echo(f"\nrun folder:      {result['run_dir']}\nreport:          {result['compare']['markdown']}\n"
               f"plot:            {result['compare']['plot']}\nMLflow store:    {result['tracking_uri']}\n"
               f"MLflow UI:       mlflow ui --backend-store-uri {result['tracking_uri']}")


@app.command()
def compare(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Table of the registered versions in MLflow (any tracking URI), with report and plot."""
    from kd_core.stages import RunPaths, compare as compare_stage

    cfg = _load(params, set_)
    try:
        result = compare_stage(cfg, RunPaths.of(cfg))
    except USER_ERRORS as err:
        _fail(err)
    print_table(result)


@app.command()
def serve(params: Path = ParamsOpt, cron: str = typer.Option("0 3 * * *", help="cron schedule"),
          name: str = typer.Option("kd-pipeline-scheduled", help="deployment name")) -> None:
    """Serve the flow as a scheduled deployment (needs a Prefect server: PREFECT_API_URL)."""
    _load(params, None)
    from flows.pipeline import kd_pipeline

    kd_pipeline.serve(name=name, cron=cron, parameters={"params_path": str(params)})


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from kd_core.evaluation.compare import COLUMNS, format_metric

    table = Table(title="registered models")
    for col in ["model", "method", "params"] + [h for _, h, _ in COLUMNS] + ["aliases"]:
        table.add_column(col)
    for r in result["rows"]:
        t = r["tags"]
        method = t.get("kd.method", "") + (f" ({t['kd.divergence']})" if t.get("kd.divergence") else "")
        table.add_row(r["label"], method, t.get("kd.parameters", ""), *[format_metric(r["metrics"], k, f) for k, _, f in COLUMNS],
                      ", ".join(r["aliases"]))
    Console(width=200).print(table)
    for p in result.get("paired_vs_sft", []):
        typer.echo(f"  {p['model']:>12} vs {p['vs']}: ΔROUGE-L {p['mean_diff']:+.2f} "
                   f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}], p = {p['p_value']:.3f} over {p['n_prompts']} test prompts")


def main() -> None:  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
