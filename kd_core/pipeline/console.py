"""The console of `kd run`: one line per stage start and end (`▶ distill fkl`, `✓ distill fkl 47.3 s`,
`· distill fkl up to date (DVC)`), written to stderr above the stage's progress bar (a terminal only:
`kd_core.progress.progress`) and to the Prefect run log (the UI's logs); the summary lines after the run (the
champion, the UI commands). Only the pipeline (`execute`), the flow and the CLI use it (no stage imports it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from kd_core.io import size_text
from kd_core.progress import stage_bar

MARKS = {"start": ("▶", ">"), "done": ("✓", "+"), "skip": ("·", "-"), "fail": ("✗", "x")}
_WRITE = threading.Lock()


def mark(kind: str) -> str:
    """The line's mark: Unicode where stderr can encode it, else ASCII."""
    fancy, plain = MARKS[kind]
    try:
        fancy.encode(getattr(sys.stderr, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return plain
    return fancy


def label(stage: str, key: str | None) -> str:
    """`distill fkl`, `prepare`."""
    return f"{stage} {key}" if key else stage


def seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"


def say(line: str, log=None) -> None:
    """One line on stderr, above any progress bar, and into the Prefect run log `log` (INFO: the server's
    logs; Prefect's console shows warnings only, kd_core.env)."""
    from tqdm import tqdm

    with _WRITE:
        try:
            tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()
        except OSError:  # stderr into a file on a full disk: the line is not worth the error being reported
            pass
    if log is not None:
        log.info(line)


class StageLines:
    """The end line's extra words (`note`), set by the stage's caller from its result."""

    note: str = ""


@contextlib.contextmanager
def stage(name: str, log=None):
    """`▶ name` now, `✓ name 12.3 s[, note]` at the end (`✗ name failed after 1.2 s: Error` on an error), and
    the stage's progress bar in between."""
    say(f"{mark('start')} {name}", log)
    lines = StageLines()
    start = time.perf_counter()
    try:
        with stage_bar(name):
            yield lines
    except BaseException as err:
        say(f"{mark('fail')} {name} failed after {seconds(time.perf_counter() - start)}: {type(err).__name__}", log)
        raise
    say(f"{mark('done')} {name} {seconds(time.perf_counter() - start)}" + (f" · {lines.note}" if lines.note else ""),
        log)




def note(stage_name: str, result, champion_metric: str) -> str:
    """A stage's result in a few words for its end line: the final training loss, the champion metric."""
    if not isinstance(result, dict):
        return ""
    if stage_name in ("train_teacher", "distill") and isinstance(result.get("final_loss"), (int, float)):
        return f"loss {result['final_loss']:.3f}"
    served = " (served by another process)" if stage_name == "evaluate" and result.get("served") else ""
    if stage_name == "evaluate" and isinstance(result.get(champion_metric), (int, float)):
        return f"{champion_metric} {result[champion_metric]:.2f}{served}"
    if served:
        return served.strip(" ()")
    if stage_name == "register" and isinstance(result.get("versions"), dict):
        new = sum(1 for v in result["versions"].values() if v.get("new"))
        served = "".join(f"; {name} not registered (served by another process)" for name in
                         result.get("not_registered") or {})
        return f"{new} new version(s) of {len(result['versions'])}{served}"
    if stage_name == "cache_teacher" and isinstance(result.get("bytes_per_token"), (int, float)):
        return f"{result.get('source', '')} · {size_text(result['bytes'])}, {result['bytes_per_token']:.0f} bytes per token"
    if stage_name == "transfer" and "rows" in result:
        return f"{result['rows']} rows"
    return ""


# ----------------------------------------------------------------------------------------------- after the run
def venv_bin(name: str) -> str:
    """A console script of this environment (beside the running python), so a printed command works without
    the venv on PATH; else the bare name."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else name


def _public(uri: str) -> str:
    """The URI without user:password."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def mlflow_ui(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> dict:
    """Where to look at a run in MLflow: {"url": the run's page, "command": how to start a UI (a sqlite or file
    store has none running)}."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id and run_id else ""
    if tracking_uri.startswith(("http://", "https://")):
        return {"url": _public(tracking_uri).rstrip("/") + "/" + page, "command": ""}
    command = f"{shlex.quote(venv_bin('mlflow'))} ui --backend-store-uri {shlex.quote(tracking_uri)}"
    return {"url": "http://127.0.0.1:5000/" + page, "command": command}


def prefect_ui(flow_run_id: str | None = None) -> dict:
    """Where to look at a flow run in Prefect: {"url", "command"}: the configured server's UI, or, when `kd run`
    used Prefect's temporary server on the project's Prefect home, the command that starts one on that home."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

    page = f"runs/flow-run/{flow_run_id}" if flow_run_id else ""
    if PREFECT_API_URL.value():
        ui = PREFECT_UI_URL.value() or re.sub(r"/api/?$", "", PREFECT_API_URL.value())
        return {"url": _public(ui).rstrip("/") + "/" + page, "command": ""}
    home = str(Path(PREFECT_HOME.value()).expanduser().resolve())
    command = f"PREFECT_HOME={shlex.quote(home)} {shlex.quote(venv_bin('prefect'))} server start"
    return {"url": "http://127.0.0.1:4200/" + page, "command": command}


def champion(result: dict, registered_model: str) -> str:
    """`kd-student v3 (jsd), pinned/rougeL_sampled_mean = 8.31` from the register stage's decision
    (`registered["champion"]`) and the comparison rows (the model's name and metric)."""
    decision = (result.get("registered") or {}).get("champion") or {}
    version = decision.get("version")
    if version is None:
        return f"none ({decision.get('reason', 'no decision')})"
    rows = (result.get("compare") or {}).get("rows", [])
    row = next((r for r in rows if r.get("name") == registered_model and str(r.get("version")) == str(version)), {})
    model = (row.get("tags") or {}).get("kd.model", "?")
    metric = decision.get("metric") or (result.get("compare") or {}).get("metric", "")
    value = decision.get("value", (row.get("metrics") or {}).get(metric))
    shown = f", {metric} = {value:.2f}" if isinstance(value, (int, float)) and metric else ""
    why = "" if decision.get("moved") else f" (kept: {decision.get('reason', 'unchanged')})"
    return f"{registered_model} v{version} ({model}){shown}{why}"


# ----------------------------------------------------------------------------------------------- MLflow's prints
_REGISTRY_MESSAGES = re.compile(r"^(Successfully registered model '|Created version '|Registered model '.*' already "
                                r"exists\. Creating a new version)")


class _RegistryQuiet:
    """MLflow's event stream without its registry announcements ("Successfully registered model 'x'.",
    "Created version '2' of model 'x'.": the stage lines and the table say it); everything else passes."""

    def __init__(self, stream):
        self.stream = stream
        self._skip_newline = False

    def write(self, text):
        if _REGISTRY_MESSAGES.match(text):
            self._skip_newline = True  # print() writes the message, then its "\n"
            return len(text)
        if self._skip_newline and text == "\n":
            self._skip_newline = False
            return 1
        self._skip_newline = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_mlflow_registry() -> None:
    """Drop MLflow's registry announcements (its `eprint`, which reads this module global at each call)."""
    from mlflow.utils import logging_utils

    if not isinstance(logging_utils.MLFLOW_LOGGING_STREAM, _RegistryQuiet):
        logging_utils.MLFLOW_LOGGING_STREAM = _RegistryQuiet(logging_utils.MLFLOW_LOGGING_STREAM)


class _ReportedWithoutTraceback(logging.Filter):
    """Prefect's engine logs a failed task or flow run with its traceback; for bad input and errors of ours
    (`kd_core.errors.is_reported`: one line each, with its exit status) the message says it all, so the record
    keeps its message and loses the traceback (on the console and in the UI's logs alike)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kd_core.errors import is_reported

        if record.exc_info and record.exc_info[1] is not None and is_reported(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_reported_errors() -> None:
    """Install `_ReportedWithoutTraceback` on Prefect's flow-run and task-run loggers (once)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReportedWithoutTraceback) for f in logger.filters):
            logger.addFilter(_ReportedWithoutTraceback())
