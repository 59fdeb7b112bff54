"""The console of `kd run` and what the Prefect UI shows (issue 13, items 4 and 5): one start and one end line
per stage and no library noise when not a terminal, the champion named, UI commands that work as printed; in
Prefect: run names from the run folder and time, logs in every task run, no task for a stage that does not
apply (its DVC stage still recorded), the resolved config and the comparison (images inlined, the MLflow run)
as artifacts."""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from kd_core.config import parse_config
from kd_core.env import quiet_libraries
from kd_core.pipeline import console
from kd_core.pipeline.dag import expand
from kd_core.progress import Progress, bars_enabled, stage_bar
from tests.conftest import dvc_project, dvc_status, tiny_params

NOISE = ("Loading weights", "Writing model shards", "Successfully registered", "Created version",
         "Creating initial MLflow database", "Setting accelerator to CPU", "{'loss'", "it/s]", "%|",
         "Token indices sequence length", "attention_mask")


@pytest.mark.slow
def test_kd_run_console_prefect_logs_artifacts_and_inline_stages(project, empty_stores):
    """The tiny config through `kd run` (a process, as a user runs it, on a test Prefect server) in a git + DVC
    project: sft has no post-distillation fine-tuning and no student has a teacher cache."""
    import os
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.settings import PREFECT_API_URL

    params = tiny_params()
    dvc_project(project, params)
    cfg = parse_config(params)
    nodes = expand(cfg)
    inline = {n.name for n in nodes if n.stage.name in ("finetune", "cache_teacher") and not
              (n.stage.name == "finetune" and n.key == "fkl")}
    assert inline == {"finetune@sft", "cache_teacher@sft", "cache_teacher@fkl"}
    with empty_stores.prefect_harness():
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a pipe (pytest-xdist workers set COLUMNS)
        out = subprocess.run([str(Path(sys.executable).with_name("kd")), "run"], cwd=project, text=True,
                             capture_output=True, env=env | {"PREFECT_API_URL": PREFECT_API_URL.value()})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        with get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            tasks = client.read_task_runs()
            logs = {t.name: [log.message for log in client.read_logs(
                log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[t.id])))] for t in tasks}
            artifacts = {a.key: a for a in client.read_artifacts()}
    shown = out.stdout + out.stderr  # everything a user sees (kd prints, Prefect's console, libraries)
    lines = [line for line in shown.splitlines() if line.strip()]

    # the console: one start and one end line per task, one line per inline stage, nothing else but the summary
    for node in nodes:
        name = console.label(node.stage.name, node.key)
        if node.name in inline:
            assert sum(line.startswith(f"· {name} not configured (no task, ") for line in lines) == 1, name
            assert f"▶ {name}" not in lines
        else:
            assert sum(line == f"▶ {name}" for line in lines) == 1, name
            ended = [line for line in lines if re.fullmatch(rf"✓ {re.escape(name)} \d+\.\d s( · .+)?", line)]
            assert len(ended) == 1, name
    assert not [line for line in lines if any(noise in line for noise in NOISE)], shown
    assert len(lines) < 50, shown  # 24 stage lines, the table (~9 lines), the summary (~12)
    champion = next(line for line in lines if line.startswith("champion:"))
    assert re.fullmatch(r"champion: +kd-student v\d+ \((sft|fkl)\), test/rougeL_sampled_mean = \d+\.\d\d", champion)
    mlflow_ui = next(line for line in lines if line.startswith("MLflow UI:"))
    shown_bin = re.search(r"(\S+)/mlflow ui --backend-store-uri sqlite:///", mlflow_ui)
    assert shown_bin and Path(shown_bin[1]).resolve() == Path(sys.executable).parent.resolve(), mlflow_ui

    # Prefect: the run's name, no task for the stages that do not apply, every task run with its start/end lines
    assert re.fullmatch(r"tiny-\d{4}-\d{2}-\d{2}-\d{4}", flow_run.name), flow_run.name
    names = {t.name for t in tasks}
    assert {"prepare", "distill-sft", "distill-fkl", "finetune-fkl", "evaluate-sft", "register", "compare"} <= names
    assert not names & {"finetune-sft", "cache_teacher-sft", "cache_teacher-fkl"}
    assert len(tasks) == len(nodes) - len(inline)
    for task_name, messages in logs.items():
        label = task_name.replace("-", " ", 1) if task_name != "train_teacher" else task_name
        assert f"▶ {label}" in messages and any(m.startswith(f"✓ {label} ") for m in messages), (task_name, messages)
    # ... while DVC recorded every stage, the inline ones too
    assert dvc_status(project) == {}
    lock = (project / "dvc.lock").read_text()
    assert all(f"{name}:" in lock for name in inline)

    # the artifacts: the resolved config; the comparison with its plots inlined and the MLflow run
    config = artifacts["kd-config"].data
    assert "```yaml" in config and "fkl:" in config and "divergence: fkl" in config
    compare = artifacts["kd-comparison"].data
    assert not re.search(r"!\[[^\]]*\]\((?!data:)[^)]*\)", compare), "an image with a relative path"
    assert compare.count("](data:image/png;base64,") == 2
    assert re.search(r"mlflow ui --backend-store-uri sqlite:///\S+`, then open http://127\.0\.0\.1:5000/#/experiments/"
                     r"\d+/runs/[0-9a-f]{32}", compare), compare[:600]


def test_comparison_markdown_inlines_images_and_links_mlflow(tmp_path):
    from flows.pipeline import comparison_markdown

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
    (tmp_path / "plot.png").write_bytes(png)
    report = tmp_path / "compare.md"
    report.write_text("# Registered models\n\ntext\n\n![a plot](plot.png)\n\n![missing](gone.png)\n"
                      "![remote](https://example.org/x.png)\n")
    md = comparison_markdown(report, console.mlflow_ui("http://user:secret@mlflow.example:5000", "3", "ab12"))
    assert f"![a plot](data:image/png;base64,{base64.b64encode(png).decode()})" in md
    assert "![missing](gone.png)" in md and "![remote](https://example.org/x.png)" in md  # left as they were
    assert md.startswith("# Registered models\n\nMLflow pipeline run")
    assert "(http://mlflow.example:5000/#/experiments/3/runs/ab12)" in md and "secret" not in md
    local = comparison_markdown(report, console.mlflow_ui("sqlite:////data/mlflow.db", "1", "ff"))
    mlflow = Path(sys.executable).parent / "mlflow"
    assert f"`{mlflow} ui --backend-store-uri sqlite:////data/mlflow.db`" in local
    assert "http://127.0.0.1:5000/#/experiments/1/runs/ff" in local


def test_ui_commands_work_as_printed(monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_HOME: str(tmp_path / "ph")}):
        local = console.prefect_ui("f-1")
    assert local["command"] == f"PREFECT_HOME={tmp_path / 'ph'} {Path(sys.executable).parent / 'prefect'} server start"
    assert local["url"] == "http://127.0.0.1:4200/runs/flow-run/f-1"
    with temporary_settings({PREFECT_API_URL: "http://prefect.example:4200/api"}):
        remote = console.prefect_ui("f-1")
    assert remote == {"url": "http://prefect.example:4200/runs/flow-run/f-1", "command": ""}


def test_champion_line():
    rows = [{"name": "kd-student", "version": 3, "tags": {"kd.model": "jsd"}, "metrics": {"pinned/m": 8.314}}]
    moved = {"registered": {"champion": {"moved": True, "version": 3, "metric": "pinned/m", "value": 8.314}},
             "compare": {"rows": rows, "metric": "pinned/m"}}
    assert console.champion(moved, "kd-student") == "kd-student v3 (jsd), pinned/m = 8.31"
    kept = {"registered": {"champion": {"moved": False, "version": 3, "reason": "already champion"}},
            "compare": {"rows": rows, "metric": "pinned/m"}}
    assert console.champion(kept, "kd-student") == "kd-student v3 (jsd), pinned/m = 8.31 (kept: already champion)"
    none = {"registered": {"champion": {"moved": False, "reason": "no version has metric 'x'"}}, "compare": {}}
    assert console.champion(none, "kd-student") == "none (no version has metric 'x')"


def test_table_fits_the_terminal_or_takes_its_width_in_a_pipe(monkeypatch, capsys):
    from kd_core.cli import print_table

    metrics = {"parameters": 24416.0, "train_time_s": 12.0, "val/ppl": 186.2, "test/top1_agreement": 0.58,
               "test/rougeL_greedy": 7.1, "test/exact_match_greedy": 1.0}
    for key in ("test/rougeL_sampled", "test/exact_match_sampled"):
        metrics |= {f"{key}_mean": 6.31, f"{key}_ci_low": 5.02, f"{key}_ci_high": 7.64}
    rows = [{"name": "kd-student", "version": v, "label": f"student{v} (kd-student v{v})", "aliases": ["champion"],
             "tags": {"kd.role": "student", "kd.method": "kd", "kd.divergence": "fkl", "kd.parameters": "24416"},
             "metrics": metrics} for v in (1, 2)]
    monkeypatch.setenv("COLUMNS", "90")
    print_table({"rows": rows})
    narrow = capsys.readouterr().out.splitlines()
    assert narrow and max(len(line) for line in narrow) <= 90
    monkeypatch.delenv("COLUMNS")
    print_table({"rows": rows})
    wide = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in wide) > 90  # a pipe: the table's own width, no cell cut


def _default_run_rows() -> list[dict]:
    """Registered versions shaped as the default run's (teacher, SFT, three KD students; long names, two-digit
    versions), evaluated on `test` and `pinned` (every metric with its CI where the evaluation gives one)."""
    rows = []
    models = [("teacher", "kd-teacher", "teacher-sft", "", "3612345"), ("sft", "kd-student", "sft", "", "612345"),
              ("seqkd", "kd-student", "seqkd", "", "612345"), ("jsd_transfer", "kd-student", "kd", "jsd", "612345"),
              ("jsd_labeled", "kd-student", "kd", "jsd", "612345")]
    for version, (model, name, method, divergence, parameters) in enumerate(models, start=41):
        metrics = {"parameters": float(parameters), "train_time_s": 112.0, "val/ppl": 1186.23,
                   "test/top1_agreement": 0.581}
        for eval_set in ("test", "pinned"):
            metrics |= {f"{eval_set}/rougeL_greedy": 17.12, f"{eval_set}/exact_match_greedy": 11.0}
            for key in (f"{eval_set}/rougeL_sampled", f"{eval_set}/exact_match_sampled"):
                metrics |= {f"{key}_mean": 10.63, f"{key}_ci_low": 9.81, f"{key}_ci_high": 11.42}
        tags = {"kd.model": model, "kd.role": "teacher" if model == "teacher" else "student", "kd.method": method,
                "kd.divergence": divergence, "kd.parameters": parameters}
        rows.append({"name": name, "version": version, "label": f"{model} ({name} v{version})", "tags": tags,
                     "aliases": ["champion"] if model == "seqkd" else [], "metrics": metrics})
    return rows


def test_console_table_of_the_default_run_fits_120_columns_and_the_report_keeps_every_column(monkeypatch, capsys):
    from kd_core.cli import print_table
    from kd_core.evaluation.compare import COLUMNS, markdown_table

    rows = _default_run_rows()
    paired = [{"model": r["tags"]["kd.model"], "vs": "sft", "mean_diff": -4.12, "ci_low": -5.61, "ci_high": -2.63,
               "p_value": 0.0004, "n_prompts": 500, "set": "pinned"} for r in rows if r["tags"]["kd.model"] != "sft"]
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: the table at its own width
    print_table({"rows": rows, "paired_vs_sft": paired, "metric": "pinned/rougeL_sampled_mean",
                 "paired_set": "pinned"})
    shown = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in shown) <= 120, "\n".join(shown)
    jsd = next(line for line in shown if "jsd_transfer v44" in line)
    assert "10.63 [9.81, 11.42]" in jsd and "612k" in jsd and "kd (jsd)" in jsd  # the champion set's ROUGE-L, CI
    assert "pinned prompts" in shown[0]
    report = markdown_table(rows, "pinned").splitlines()
    assert all(header in report[0] for _, header, _ in COLUMNS)  # the report: every column, every CI
    assert "| jsd_transfer (kd-student v44) | student | kd (jsd) | 612345 | 10.63 [9.81, 11.42] |" in report[5]


def test_no_progress_bar_off_a_terminal_and_one_labelled_bar_per_stage_on_one(monkeypatch, capsys):
    assert not bars_enabled()  # pytest captures stderr: not a terminal
    with stage_bar("distill fkl") as bar:
        assert bar is None
        with Progress(10, "steps") as p:
            p.update(10)
    assert capsys.readouterr().err == ""

    class Tty:
        encoding = "utf-8"

        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    with stage_bar("evaluate fkl") as bar:
        for total in (4, 4):  # two generation passes: one bar, counting (not 4/8 = 50 % after 100 %)
            with Progress(total, "prompts") as p:
                p.update(total)
        assert (bar._bar.n, bar._bar.total) == (8, None)
    assert tty.text.startswith("\revaluate fkl:   0%|") and bar._bar is None  # removed at the stage's end


def test_library_noise_is_dropped_and_other_messages_pass():
    quiet_libraries()

    def passes(logger: str, message: str) -> bool:
        record = logging.LogRecord(logger, logging.WARNING, __file__, 1, message, None, None)
        return bool(logging.getLogger(logger).filter(record))

    assert not passes("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert not passes("transformers.tokenization_utils_base",
                      "Token indices sequence length is longer than the specified maximum sequence length (94 > 64)")
    assert passes("DeepSpeed", "something else")
    assert logging.getLogger("mlflow.store.db.utils").getEffectiveLevel() >= logging.WARNING


def test_mlflow_registry_announcements_are_dropped(capsys):
    from mlflow.utils import logging_utils

    console.quiet_mlflow_registry()
    logging_utils.eprint("Successfully registered model 'kd-student'.")
    logging_utils.eprint("Created version '2' of model 'kd-student'.")
    logging_utils.eprint("Registered model 'kd-student' already exists. Creating a new version of this model...")
    logging_utils.eprint("something MLflow wants said")
    assert capsys.readouterr().err == "something MLflow wants said\n"


def test_training_prints_no_log_dicts():
    from kd_core.config import TrainingConfig
    from kd_core.training.trainer import training_arguments

    assert training_arguments(TrainingConfig(), Path("/tmp/x"), 0).disable_tqdm is True  # no Trainer bar or dicts


def test_prefect_console_quiet_by_default_and_prefect_own_at_a_chosen_level():
    """By default Prefect's console shows warnings while the run loggers send INFO to the server; a child
    process given PREFECT_LOGGING_LEVEL=INFO gets Prefect's own console at INFO (not the quiet one it inherits)."""
    import os
    import subprocess

    show = "import kd_core, os, json; print(json.dumps({k: v for k, v in os.environ.items() if 'PREFECT_LOGG' in k}))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    quiet = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert json.loads(quiet.stdout) == {"PREFECT_LOGGING_LEVEL": "WARNING",
                                        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
                                        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
                                        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO"}
    child = dict(env, **json.loads(quiet.stdout)) | {"PREFECT_LOGGING_LEVEL": "INFO"}
    chosen = subprocess.run([sys.executable, "-c", show], env=child, capture_output=True, text=True, check=True)
    assert json.loads(chosen.stdout) == {"PREFECT_LOGGING_LEVEL": "INFO"}
