"""Bad input, preflight and credentials: each case is one clear message naming the file, line or key, `kd`
exits with status 2, and nothing is registered (the MLflow registry stays empty) or left half-written."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kd_core.cli import app
from kd_core.config import ConfigError, TrainingConfig, load_config, parse_config
from kd_core.errors import PreflightError, TrackingUnreachable
from kd_core.training.preflight import check_disk, checkpoint_bytes, preflight
from kd_core.run import RunPaths
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from kd_core.tracking.store import check_tracking
from tests.conftest import free_port, tiny_params, write_params


def _kd(*args: str):
    return CliRunner().invoke(app, list(args))


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _nothing_registered(project: Path) -> bool:
    db = project / "mlflow.db"
    return not db.exists() or MlflowClient(f"sqlite:///{db}").search_registered_models() == []


def _rows(n: int, start: int = 0, response: str = "ok") -> list[dict]:
    return [{"instruction": f"say {i}", "response": f"{response} {i}"} for i in range(start, start + n)]


def _file_params(path: str, **data) -> dict:
    p = tiny_params()
    p["data"] = {"source": "file", "path": path, "template": "minimal",
                 "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}} | data
    return p


def _teacher_ready(project: Path, params: dict):
    """prepare + the teacher materialised untrained (teacher.train: false): what distill needs, in seconds."""
    params["teacher"]["train"] = False
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    train_teacher(cfg, paths)
    return cfg, paths


# ------------------------------------------------------------------------------------------- data files
def test_non_utf8_bytes_name_file_and_line(project):
    lines = [json.dumps(r).encode() for r in _rows(20)]
    lines[6] = b'{"instruction": "caf\xe9", "response": "x"}'
    (project / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    write_params(project, _file_params("data.jsonl", max_bad_fraction=0.0))
    result = _kd("stage", "prepare")
    assert result.exit_code == 2
    assert "data.jsonl:7: not valid UTF-8" in result.stderr
    assert "data.max_bad_fraction=0.0" in result.stderr
    assert not (project / "runs").exists() and _nothing_registered(project)


def test_repeated_row_ids_name_the_file_and_the_column(project):
    rows = [dict(r, id=1 if i in (3, 8) else i) for i, r in enumerate(_rows(20))]
    (project / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_params(project, _file_params("data.jsonl"))
    result = _kd("stage", "prepare")
    assert result.exit_code == 2
    assert _errors(result) == ["error: data.jsonl: column 'id' (the row id) repeats 1 value(s), e.g. ['1']: give "
                               "each row its own id, or drop the column (rows are then numbered)"]
    assert not (project / "runs").exists()


def test_empty_split_after_filtering(project):
    rows = _rows(3) + [{"instruction": f"q {i}", "response": ""} for i in range(30)]  # empty responses: filtered
    (project / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_params(project, _file_params("data.jsonl", max_bad_fraction=0.95))
    result = _kd("stage", "prepare")
    assert result.exit_code == 2
    assert _errors(result) == ["error: split 'val' is empty after validation (3 valid rows): use more data or "
                               "change data.split"]
    assert not (project / "runs").exists() and _nothing_registered(project)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_rows_are_counted_in_the_prepare_report_and_handled_per_params(project, policy):
    from kd_core.data.template import format_prompt
    from kd_core.data.tokenize import load_tokenizer
    from kd_core.run import load_train_set as _train_set

    rows = _rows(60) + _rows(20, start=100, response="a long answer " * 12)
    (project / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = _file_params("data.jsonl")
    params["tokenizer"]["overlong"] = policy
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    report = prepare(cfg, paths)
    tok = load_tokenizer(paths.tokenizer)

    def n_tokens(r):  # prompt + response + EOS, as training encodes them
        prompt = tok(format_prompt(r, "minimal"))["input_ids"]
        return len(prompt) + len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1

    train = [json.loads(line) for line in paths.split("train").read_text().splitlines()]
    over = sum(n_tokens(r) > cfg.tokenizer.max_length for r in train)
    assert 0 < over < len(train)
    assert report["overlong"] == json.loads((paths.data / "report.json").read_text())["overlong"]
    assert report["overlong"]["policy"] == policy and report["overlong"]["rows"]["train"] == over
    ds, dropped = _train_set(cfg, paths, tok)
    assert dropped == (over if policy == "drop" else 0)
    assert len(ds) == len(train) - dropped
    assert max(len(e.input_ids) for e in ds.examples) <= cfg.tokenizer.max_length


def test_all_rows_overlong_with_drop_is_an_error(project):
    (project / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(40, response="long " * 40)))
    params = _file_params("data.jsonl")
    params["tokenizer"]["overlong"] = "drop"
    write_params(project, params)
    result = _kd("stage", "prepare")
    assert result.exit_code == 2
    assert "split 'train': all" in result.stderr
    assert "tokenizer.max_length=48 and tokenizer.overlong is 'drop'" in result.stderr


# ------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("key, value, message", [
    ("alpha", 1.5, "students.fkl.alpha: Input should be less than or equal to 1"),
    ("alpha", -0.1, "students.fkl.alpha: Input should be greater than or equal to 0"),
    ("temperature", 0, "students.fkl.temperature: Input should be greater than 0"),
    ("divergence_args", {"beta": 1.5}, "students.fkl.divergence_args.beta: 1.5 is outside [0.0, 1.0]"),
])
def test_weights_and_beta_out_of_range(project, key, value, message):
    params = tiny_params()
    params["students"]["fkl"][key] = value
    if key == "divergence_args":
        params["students"]["fkl"]["divergence"] = "jsd"
    write_params(project, params)
    result = _kd("run")
    assert result.exit_code == 2
    assert _errors(result) == [f"error: params.yaml: {message}"]
    assert not (project / "runs").exists() and _nothing_registered(project)


# ------------------------------------------------------------------------------------------- checkpoints
def test_teacher_checkpoint_that_does_not_exist(project):
    params = tiny_params()
    params["teacher"]["model"] = {"checkpoint": "./checkpoints/no-such-teacher"}
    write_params(project, params)
    result = _kd("stage", "prepare")
    assert result.exit_code == 2
    assert _errors(result) == ["error: teacher.model.checkpoint: './checkpoints/no-such-teacher' does not exist"]
    assert not (project / "runs").exists() and _nothing_registered(project)


def test_checkpoint_that_is_not_a_causal_lm(project):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
                               ).save_pretrained(project / "t5")
    params = tiny_params()
    params["students"]["fkl"]["model"] = {"checkpoint": "./t5"}
    _teacher_ready(project, params)
    result = _kd("stage", "distill", "--model", "fkl")
    assert result.exit_code == 2
    assert "error: checkpoint './t5' (T5Config) is not a causal LM" in result.stderr
    assert not (project / "runs/tiny/distilled/fkl").exists() and _nothing_registered(project)


def test_student_with_another_tokenizer_fails_preflight(project):
    from kd_core.data.tokenize import train_bpe_tokenizer
    from kd_core.models.build import build_from_config

    params = tiny_params()
    _, paths = _teacher_ready(project, params)
    from kd_core.data.builtin import generate_builtin

    # a BPE of another size on other data: a larger vocabulary (the size check passes), other token ids
    other = train_bpe_tokenizer((r["instruction"] + " " + r["response"] for r in generate_builtin(600, 7)), 600)
    assert len(other) > 300
    student = build_from_config(parse_config(params).student("fkl").model.config, other, 64, 0)
    student.save_pretrained(project / "other-student")
    other.save_pretrained(project / "other-student")
    params["students"]["fkl"]["model"] = {"checkpoint": "./other-student"}
    write_params(project, params)
    result = _kd("stage", "distill", "--model", "fkl")
    assert result.exit_code == 2
    [line] = _errors(result)
    assert line.startswith("error: preflight of distill fkl: student checkpoint './other-student' has another "
                           "tokenizer than the run's (the teacher's)")
    assert line.endswith("teacher and student must share a tokenizer, or use a method that distils across "
                         "tokenizers: gold, uld")
    assert not paths.distilled("fkl").exists() and _nothing_registered(project)


# ------------------------------------------------------------------------------------------- tracking
def test_unreachable_tracking_uri(project, monkeypatch):
    cfg = load_config(write_params(project, tiny_params()))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = _kd("stage", "train_teacher")
    assert result.exit_code == 2
    [line] = _errors(result)
    assert line.startswith(f"error: preflight of train_teacher: MLflow tracking server {uri} is not reachable (")
    assert line.endswith("start it, or fix MLFLOW_TRACKING_URI / tracking.tracking_uri")
    assert not paths.model("teacher").exists() and not paths.train_info("teacher").exists()
    assert _nothing_registered(project)
    # the stages that are not training fail the same way, before MLflow's own retries
    assert "is not reachable" in _kd("stage", "prepare").stderr


SCHEMES = "databricks, databricks-uc, file, http, https, mssql, mysql, postgresql, sqlite, uc, or a plain path"


def test_the_tracking_schemes_are_mlflows():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from kd_core.config.tracking_store import MLFLOW_SCHEMES

    assert MLFLOW_SCHEMES == set(_tracking_store_registry._registry)


@pytest.mark.parametrize("uri, problem", [
    ("nonsense://x", f"unknown scheme 'nonsense' (allowed: {SCHEMES})"),
    ("sqlite:////proc/nope/mlflow.db", "cannot write in /proc/nope"),
])
def test_a_tracking_store_that_cannot_be_used_stops_a_stage_before_it_writes(project, monkeypatch, uri, problem):
    """A URI MLflow has no store for, or a store that cannot be written: `kd validate` names the key (a scheme
    is known before anything runs); from MLFLOW_TRACKING_URI, `prepare` stops before writing its outputs (it
    was MLflow's traceback, status 1, after them, or the error after them)."""
    write_params(project, tiny_params())
    if problem.startswith("unknown"):
        result = _kd("validate", "--set", f"tracking.tracking_uri={uri}")
        assert result.exit_code == 2 and _errors(result) == [f"error: params.yaml: tracking.tracking_uri: {problem}"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = _kd("stage", "prepare")
    assert result.exit_code == 2
    [line] = _errors(result)
    assert line.startswith(f"error: preflight of prepare: MLflow tracking store {uri}: {problem}"), line
    assert not (project / "runs").exists()


class _Health(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):  # noqa: N802
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_tracking_server_that_answers_unhealthy():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(PreflightError, match=rf"^MLflow tracking server {uri} is not healthy: GET /health -> 503$"):
            check_tracking(uri)
        _Health.status = 200
        check_tracking(uri + "/")
    finally:
        _Health.status = 503
        server.shutdown()


def test_tracking_store_and_outputs_must_be_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = f"sqlite:///{blocker}/mlflow.db"
    with pytest.raises(PreflightError, match=rf"MLflow tracking store {store}: cannot write in {blocker}"):
        check_tracking(store)
    check_tracking(f"sqlite:///{tmp_path}/store/mlflow.db")  # a missing folder is created

    from kd_core.data.tokenize import train_bpe_tokenizer
    from kd_core.models.build import build_from_config, count_parameters

    params = tiny_params(run_dir=str(blocker / "run"))
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = parse_config(params)
    tok = train_bpe_tokenizer((f"row {i}" for i in range(50)), 300)
    model = build_from_config(cfg.teacher.model.config, tok, 32, 0)
    with pytest.raises(PreflightError, match=rf"^preflight of train_teacher: output folder {blocker}/run/models is not "):
        preflight(cfg, "train_teacher", model=model, tokenizer=tok, training=cfg.teacher.training,
                  out_dir=Path(cfg.run_dir) / "models" / "teacher", n_parameters=count_parameters(model))


def test_checkpoint_disk_estimate_and_shortage(tmp_path, monkeypatch):
    no_ckpt, ckpt = TrainingConfig(), TrainingConfig(save_steps=50)
    # final model + its atomic copy; with checkpoints, 3 of (weights + 2 Adam moments) on top; +20%
    assert checkpoint_bytes(1_000_000, no_ckpt) == int(1.2 * 2 * 4_000_000)
    assert checkpoint_bytes(1_000_000, ckpt) == int(1.2 * (2 * 4_000_000 + 3 * 3 * 4_000_000))
    import kd_core.training.preflight as pf

    free = {"bytes": 50_000_000}
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free["bytes"]})())
    with pytest.raises(PreflightError, match=r"not enough free disk for .*/runs/x/models/m: need ~52.8 MB "
                                             r"\(1,000,000 parameters, save_steps=50\), 50.0 MB free"):
        check_disk(tmp_path / "runs/x/models/m", 1_000_000, ckpt)
    check_disk(tmp_path / "runs/x/models/m", 1_000_000, no_ckpt)  # 9.6 MB without resume checkpoints
    free["bytes"] = 53_000_000
    check_disk(tmp_path / "runs/x/models/m", 1_000_000, ckpt)


def test_flow_retries_only_transient_errors():
    from flows.pipeline import _retry_transient

    class State:
        def __init__(self, err):
            self.err = err

        def result(self):
            raise self.err

    from kd_core.training.trainer import TrainingDiverged

    assert _retry_transient(None, None, State(PreflightError("preflight of distill x: ..."))) is False
    assert _retry_transient(None, None, State(TrainingDiverged("non-finite loss nan at step 3"))) is False
    assert _retry_transient(None, None, State(ConnectionError("server gone"))) is True
    assert _retry_transient(None, None, State(TrackingUnreachable("preflight of distill x: ... not reachable"))) is True


# ------------------------------------------------------------------------------------------- credentials
@pytest.mark.parametrize("where, value, message", [
    (("tracking", "tracking_uri"), "http://alice:hunter2@mlflow.example.com:5000",
     "tracking.tracking_uri: URL contains a password (user:password@)"),
    (("students", "fkl", "method_args", "api_key"), "sk-123",
     "students.fkl.method_args.api_key: looks like a credential"),
    (("data", "hf_token"), "hf_abc", "data.hf_token: looks like a credential"),
    (("tracking", "password"), "hunter2", "tracking.password: looks like a credential"),
])
def test_params_reject_credentials_and_point_to_the_env(where, value, message):
    params = tiny_params()
    node = params
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    [line] = str(err.value).splitlines()
    assert line.startswith(f"params.yaml: {message}; set credentials in the environment instead")
    assert "MLFLOW_TRACKING_PASSWORD" in line and value not in line


def test_ordinary_keys_are_not_taken_for_secrets():
    params = tiny_params()
    params["tracking"]["tracking_uri"] = "http://mlflow.example.com:5000"
    params["evaluation"]["generation"]["max_new_tokens"] = 5
    parse_config(params)


def test_password_in_env_tracking_uri_is_refused(project, monkeypatch):
    from kd_core.tracking.store import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@127.0.0.1:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI contains a password.*MLFLOW_TRACKING_USERNAME"):
        tracking_uri(parse_config(tiny_params()))


def test_credentials_from_the_env_are_not_logged(project, monkeypatch, capsys):
    secret = "s3cr3t-pa55-do-not-log"
    for var in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        monkeypatch.setenv(var, secret)
    params = tiny_params()
    params["teacher"]["training"] = dict(params["teacher"]["training"], max_steps=2)
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    train_teacher(cfg, paths)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert runs
    for run in runs:
        logged = json.dumps([run.data.params, run.data.tags, run.data.metrics])
        assert secret not in logged
    text_suffixes = (".json", ".jsonl", ".txt", ".yaml", ".log")
    on_disk = [p for p in project.rglob("*") if p.is_file() and p.suffix in text_suffixes]
    assert on_disk and not [p for p in on_disk if secret in p.read_text(errors="replace")]
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err


def test_nan_loss_stops_training_with_step_batch_and_terms(tmp_path):
    from kd_core.methods import get_method
    from kd_core.training.trainer import TrainingDiverged, train
    from tests.method_harness import tiny_setup

    setup = tiny_setup()
    method = get_method("sft")(None)
    compute = method.compute_loss

    def diverging(ctx):
        out = compute(ctx)
        if ctx.trainer.state.global_step == 2:
            out.loss = out.loss * float("nan")
        return out
    method.compute_loss = diverging
    cfg = TrainingConfig(max_steps=5, learning_rate=1e-3, batch_size=8, warmup_ratio=0.0, logging_steps=5)
    with pytest.raises(TrainingDiverged, match=r"^non-finite loss nan at step 2 \(batch \(8, \d+\), terms \{'ce': "):
        train(setup.student(), setup.train_set, setup.tokenizer, cfg, tmp_path / "student", method=method, seed=0)
    assert not (tmp_path / "student").exists(), "a diverged stage leaves no model"
