"""`kd compare` (kd_core/cli.py, kd_core/stages/compare.py) on a registry prepared by hand: three registered
versions with known metrics and per-prompt score files. Its table (one row per version, each cell formatted with
its CI, "–" for a metric a version lacks), its paired-test lines against the SFT student (paired by prompt id
over the common prompts), and its errors: one `error:` line on stderr and exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kd_core.cli import app
from kd_core.io import write_jsonl_atomic
from tests.conftest import tiny_params, write_params

METRICS = {  # per model: its run's metrics (what the registry rows carry)
    "teacher": {"test/rougeL_sampled_mean": 30.0, "val/ppl": 9.8765, "train_time_s": 12.4},
    "sft": {"test/rougeL_sampled_mean": 20.0, "test/rougeL_sampled_ci_low": 18.5, "test/rougeL_sampled_ci_high": 21.25,
            "val/ppl": 14.02, "test/top1_agreement": 0.4166},
    "fkl": {"test/rougeL_sampled_mean": 22.0, "test/rougeL_sampled_ci_low": 21.0, "test/rougeL_sampled_ci_high": 23.5,
            "test/rougeL_greedy": 18.25, "test/exact_match_sampled_mean": 5.0, "val/ppl": 12.3456,
            "test/top1_agreement": 0.5834, "train_time_s": 7.6},
}
TAGS = {
    "teacher": {"kd.role": "teacher", "kd.method": "sft", "kd.parameters": "61000"},
    "sft": {"kd.role": "student", "kd.method": "sft", "kd.parameters": "24416"},
    "fkl": {"kd.role": "student", "kd.method": "kd", "kd.divergence": "fkl", "kd.parameters": "24416"},
}
# per-prompt ROUGE-L (the evaluation's generations/<model>/test.jsonl): the teacher is 5 points above SFT on every
# common prompt, fkl +4 / −4 alternately; p5 is SFT's alone, p6 fkl's alone; fkl's rows come in another order
SCORES = {
    "sft": [("p1", 10.0), ("p2", 20.0), ("p3", 30.0), ("p4", 40.0), ("p5", 50.0)],
    "teacher": [("p1", 15.0), ("p2", 25.0), ("p3", 35.0), ("p4", 45.0)],
    "fkl": [("p4", 36.0), ("p6", 90.0), ("p2", 16.0), ("p1", 14.0), ("p3", 34.0)],
}
EXPECTED_ROWS = [  # the console's short form (kd_core.evaluation.compare.table(console=True)); the report has every column
    ["teacher v1", "sft", "61k", "30.00", "–", "–", "9.9", "–", ""],
    ["sft v1", "sft", "24k", "20.00 [18.50, 21.25]", "–", "–", "14.0", "0.42", ""],
    ["fkl v2", "kd (fkl)", "24k", "22.00 [21.00, 23.50]", "18.25", "5.0", "12.3", "0.58", "champion"],
]
REPORT_ROW = "| fkl (kd-student v2) | student | kd (fkl) | 24416 | 22.00 [21.00, 23.50] | 18.25 | 5.0 | – | 12.35 | 0.583 | 8 | champion |"
# constant differences: every resampled mean is the mean, so the CI is [+5, +5] and p its smallest value 1/(R+1);
# ±4 alternately: mean 0 (p = 1), and the 2.5 % / 97.5 % quantiles are the extremes −4 / +4 (each has mass 1/16)
TEACHER_LINE = "       teacher vs sft: ΔROUGE-L +5.00 [+5.00, +5.00], p = 0.000 over 4 test prompts"
FKL_LINE = "           fkl vs sft: ΔROUGE-L +0.00 [-4.00, +4.00], p = 1.000 over 4 test prompts"


@pytest.fixture(scope="module")
def _store(tmp_path_factory):
    """An MLflow store holding kd-teacher v1 and kd-student v1 (sft), v2 (fkl, champion), made once a module."""
    import mlflow

    folder = tmp_path_factory.mktemp("compare-store")
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    try:
        experiment = client.create_experiment("tiny", artifact_location=str(folder / "artifacts"))
        for model in ("teacher", "sft", "fkl"):
            name = "kd-teacher" if model == "teacher" else "kd-student"
            run_id = client.create_run(experiment).info.run_id
            for key, value in METRICS[model].items():
                client.log_metric(run_id, key, value)
            client.set_terminated(run_id)
            if not client.search_registered_models(f"name='{name}'"):
                client.create_registered_model(name)
            version = client.create_model_version(name, source=f"runs:/{run_id}/{model}", run_id=run_id,
                                                  tags={"kd.model": model} | TAGS[model])
        client.set_registered_model_alias("kd-student", "champion", version.version)
    finally:
        mlflow.set_tracking_uri(None)
    return folder / "mlflow.db"


@pytest.fixture
def registry(project, _store, monkeypatch):
    """The project with the tiny params, a copy of the module's MLflow store as its own, and the run folder's
    per-prompt score files."""
    import mlflow

    monkeypatch.delenv("COLUMNS", raising=False)  # not a terminal: the table takes its own width, no cell cut
    write_params(project, tiny_params())
    shutil.copy(_store, project / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")  # (the `project` fixture's URI, now a copy)
    for model, scores in SCORES.items():
        write_jsonl_atomic(project / f"runs/tiny/generations/{model}/test.jsonl",
                           [{"id": i, "rougeL_sampled_mean": s} for i, s in scores])
    return project


def _compare(*args: str):
    return CliRunner().invoke(app, ["compare", *args])


def _table_rows(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.startswith("│")]


def _one_error_line(out) -> str:
    assert out.exit_code == 2, (out.exit_code, out.output, out.exception)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_compare_prints_the_versions_table_and_the_paired_tests(registry):
    out = _compare()
    assert out.exit_code == 0, (out.output, out.exception)
    assert _table_rows(out.stdout) == EXPECTED_ROWS
    paired = [line for line in out.stdout.splitlines() if " vs sft: " in line]
    assert paired == [TEACHER_LINE, FKL_LINE]
    report = json.loads((registry / "runs/tiny/reports/compare.json").read_text())
    assert [(r["tags"]["kd.model"], r["version"]) for r in report["rows"]] == [("teacher", 1), ("sft", 1), ("fkl", 2)]
    assert REPORT_ROW in (registry / "runs/tiny/reports/compare.md").read_text().splitlines()

    # a model without its per-prompt scores has no paired test (and is no error)
    (registry / "runs/tiny/generations/fkl/test.jsonl").unlink()
    out = _compare()
    assert out.exit_code == 0, (out.output, out.exception)
    assert [line for line in out.stdout.splitlines() if " vs sft: " in line] == [TEACHER_LINE]
    assert _table_rows(out.stdout) == EXPECTED_ROWS


def test_compare_of_an_unknown_model_is_one_error_line(registry):
    """A registered model with no versions is an error, also when the teacher's registered model has some (the
    table would hold the teacher alone)."""
    line = _one_error_line(_compare("-S", "tracking.registered_model=kd-nope"))
    assert line == f"error: no registered versions of 'kd-nope' at sqlite:///{registry / 'mlflow.db'}"
    line = _one_error_line(_compare("-S", "tracking.registered_model=kd-nope",
                                    "-S", "tracking.register_teacher_as=kd-nope-teacher"))
    assert line.startswith("error: no registered versions of 'kd-nope' at ")


def test_compare_on_an_empty_store_or_a_missing_metric_is_one_error_line(registry, tmp_path, monkeypatch, empty_stores):
    line = _one_error_line(_compare("-S", "tracking.champion.metric=test/rougeL_nope"))
    assert line.startswith("error: params.yaml: tracking.champion.metric: unknown metric 'test/rougeL_nope' (allowed: ")
    line = _one_error_line(_compare("-S", "tracking.champion.metric=pinned/rougeL_sampled_mean"))
    assert line == ("error: params.yaml: tracking.champion.metric: eval set 'pinned' of 'pinned/rougeL_sampled_mean' "
                    "is not evaluated (evaluation.eval_sets; allowed: test)")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty)
    line = _one_error_line(_compare())
    assert line == (f"error: no registered versions of 'kd-student': no MLflow store at {empty} (run the pipeline "
                    "first, or set MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "empty.db").exists()  # none created (an empty store was left behind before)
    empty_stores.seed_mlflow(tmp_path / "empty.db")
    line = _one_error_line(_compare())
    assert line == f"error: no registered versions of 'kd-student' at {empty}"
