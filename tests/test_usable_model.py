"""A trained model is usable on its own (issue 13): every saved model folder is a complete Hugging Face model
(chat template, context length, generation defaults, model card) whose `pipeline("text-generation")` gives the
evaluation's greedy answers; the registered champion, served by `mlflow models serve`, answers plain
instructions with the same text; the report covers every evaluated set; `dvc metrics show` fits a terminal and
`dvc repro --dry` works after the run.

One tiny run serves every test of the module: the Prefect flow in a git + DVC project, with two eval sets. The
teacher trains long enough (on prompt tokens too) to answer with text rather than an immediate EOS, and the
students start from the teacher's layer, so equal answers are non-empty ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kd_core.config import parse_config
from kd_core.io import read_jsonl
from kd_core.run import RunPaths, n_positions
from tests.conftest import REPO, dvc_project, free_port, tiny_params, write_params

BIN = Path(sys.executable).parent
SERVE_START_S = 240  # import torch + transformers, load the model (2 shared CPU cores)
MAX_METRICS_LINE = 160


def _params() -> dict:
    params = tiny_params()
    params["teacher"]["training"] = dict(params["teacher"]["training"], max_steps=30, loss_on_prompt=True)
    for student in params["students"].values():  # whichever is champion answers with text
        student["model"] = {"from_teacher_layers": [0]}
    params["students"]["sft"]["training"] = dict(params["students"]["sft"]["training"], loss_on_prompt=True)
    params["data"]["eval_sets"] = {"pinned": {"path": "data/eval/pinned.jsonl", "limit": 6}}
    params["evaluation"]["eval_sets"] = ["test", "pinned"]
    params["tracking"]["champion"]["metric"] = "pinned/rougeL_sampled_mean"
    return params


@pytest.fixture(scope="module")
def run(tmp_path_factory, empty_stores):
    """(project, cfg, paths) of one finished flow run, recorded in DVC, with its own MLflow store."""
    import mlflow

    from flows.pipeline import kd_pipeline

    project = tmp_path_factory.mktemp("usable")
    uri = f"sqlite:///{empty_stores.seed_mlflow(project / 'mlflow.db')}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("PREFECT_HOME", str(project / ".prefect"))
        mp.setenv("DVC_SITE_CACHE_DIR", str(project / ".dvc-site-cache"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        params = _params()
        dvc_project(project, params)
        (project / "data/eval").mkdir(parents=True)
        pinned = (REPO / "data/eval/builtin_pinned.jsonl").read_text().splitlines(keepends=True)[:6]
        (project / "data/eval/pinned.jsonl").write_text("".join(pinned))
        with empty_stores.prefect_harness():
            kd_pipeline(params_path="params.yaml")
        cfg = parse_config(params)
        yield project, cfg, RunPaths.of(cfg)
        mlflow.set_tracking_uri(None)


def _rows(paths: RunPaths, model: str, sets=("test", "pinned")) -> list[dict]:
    """The evaluation's per-prompt rows of a model (instruction, context, greedy answer) over eval sets."""
    return [r for s in sets for r in read_jsonl(paths.generations(model) / f"{s}.jsonl")]


# ------------------------------------------------------------------------------------------------ item 1
@pytest.mark.slow
@pytest.mark.parametrize("name", ["teacher", "fkl"])
def test_saved_model_folder_is_a_complete_hf_model(run, name):
    import yaml
    from huggingface_hub import ModelCard
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, pipeline

    project, cfg, paths = run
    folder = project / paths.model(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert tokenizer.model_max_length == config.n_positions == n_positions(cfg)
    assert tokenizer.chat_template
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.do_sample is False and gen.max_new_tokens == cfg.evaluation.generation.max_new_tokens
    assert gen.eos_token_id == tokenizer.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id

    card_text = (folder / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card_text.split("---\n")[1])
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == meta["library_name"] == "transformers"
    assert card.data.pipeline_tag == "text-generation" and "knowledge-distillation" in card.data.tags
    assert "## How to prompt it" in card.text and "### Instruction:\n<your instruction>\n### Response:" in card.text
    assert "registered version" in card.text  # no metrics yet: the full card is the MLflow version's
    if name == "fkl":
        assert "kd" in card.data.tags and "fkl" in card.data.tags and "divergence `fkl`" in card.text
        assert "**Teacher**: teacher" in card.text and "post-distillation fine-tuning: 0.2 epoch(s)" in card.text

    # the chat format through the saved chat template gives the evaluation's greedy answer, prompt by prompt
    # (prompts within tokenizer.max_length: evaluation keeps a longer prompt's last max_length tokens, the
    # pipeline's `handle_long_generation="hole"` as many as the context leaves room for)
    generate = pipeline("text-generation", model=str(folder))
    rows = _rows(paths, name)
    compared, answers = [], []
    for r in rows:
        message = {"role": "user", "content": r["instruction"]} | ({"context": r["context"]} if r["context"] else {})
        prompt = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True, return_dict=True)
        if len(prompt["input_ids"]) > cfg.tokenizer.max_length:
            chat = generate([message], handle_long_generation="hole")[0]["generated_text"]  # no index error
            assert isinstance(chat[-1]["content"], str)
            continue
        chat = generate([message])[0]["generated_text"]
        assert chat[-1]["role"] == "assistant"
        compared.append(r)
        answers.append(chat[-1]["content"].strip())
    assert any(not r["context"] for r in compared)
    assert answers == [r["greedy"] for r in compared]
    assert any(answers), "the run's models answer with text (otherwise the equality says little)"


# ------------------------------------------------------------------------------------------------ item 2

def _post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture
def served_champion(run, tmp_path):
    """The serving command that the champion's model card prints (its MLflow description), run as printed from the
    project folder by a shell without the virtual environment on PATH and without MLflow settings (the store is
    MLflow's default: mlflow.db in the project folder), on a free port instead of 5001; the project's `.venv` is
    the tests' environment. Its base URL; stopped (its whole process group) at teardown, whatever the test did."""
    from mlflow.tracking import MlflowClient

    project, _, _ = run
    card = MlflowClient().get_model_version_by_alias("kd-student", "champion").description
    (command,) = [line for line in card.splitlines() if " models serve " in line]
    assert command.endswith(" --port 5001"), command
    port = free_port()
    command = command.removesuffix("5001") + str(port)
    venv = project / ".venv"
    venv.symlink_to(BIN.parent, target_is_directory=True)
    log = tmp_path / "serve.log"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PATH": path}
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve: no /ping answer within {SERVE_START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        venv.unlink()


@pytest.mark.slow
def test_served_champion_answers_plain_instructions_as_evaluated(run, served_champion):
    from mlflow.tracking import MlflowClient

    _, cfg, paths = run
    champion = MlflowClient().get_model_version_by_alias("kd-student", "champion").tags["kd.model"]
    rows = [r for r in _rows(paths, champion) if not r["context"]]
    n = cfg.evaluation.generation.max_new_tokens
    answer = _post(f"{served_champion}/invocations", {"inputs": [r["instruction"] for r in rows],
                                                      "params": {"max_new_tokens": n}})
    assert answer["predictions"] == [r["greedy"] for r in rows]
    assert any(answer["predictions"])
    # a prompt longer than the model's context keeps its end (no index error), as in evaluation
    long_prompt = " ".join(["sort ascending: 4 35 13 33"] * 40)
    assert isinstance(_post(f"{served_champion}/invocations", {"inputs": [long_prompt]})["predictions"][0], str)
    # the params schema is honoured: fewer new tokens give a prefix-length answer, sampling runs
    short = _post(f"{served_champion}/invocations", {"inputs": [rows[0]["instruction"]], "params": {"max_new_tokens": 1}})
    assert len(short["predictions"][0]) <= len(rows[0]["greedy"]) or not rows[0]["greedy"]
    sampled = _post(f"{served_champion}/invocations", {"inputs": [rows[0]["instruction"]],
                                                       "params": {"do_sample": True, "temperature": 1.5, "top_p": 0.9}})
    assert isinstance(sampled["predictions"][0], str)


@pytest.mark.slow
def test_registered_version_has_card_signature_and_example(run):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, cfg, _ = run
    client = MlflowClient()
    version = client.get_model_version_by_alias("kd-student", "champion")
    name = version.tags["kd.model"]
    assert version.description.startswith(f"# {name}: distilled student")  # the card without its YAML metadata
    assert "95% CI" in version.description and "pinned/rougeL_sampled" in version.description
    info = mlflow.models.get_model_info("models:/kd-student@champion")
    assert info.name == name  # the logged model is named after the model, not `model`
    assert {p.name for p in info.signature.params} >= {"max_new_tokens", "do_sample", "temperature", "top_p"}
    assert info.saved_input_example_info is not None
    assert info.metadata["prompt_template"] == "### Instruction:\n{prompt}\n### Response:\n"
    card = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=f"{name}/README.md")
    readme = Path(card).read_text(encoding="utf-8")
    assert readme.startswith("---\n") and readme.endswith(version.description)


@pytest.mark.slow
def test_registered_version_has_a_handful_of_tags_and_kd_lineage_reads_its_run(run):
    """The registry's list shows a few tags per version (`registry.VERSION_TAGS`); the full lineage (the DVC hashes
    of the data and the model, the eval prompts' hashes) is the `kd.lineage` document of its run, which `kd
    lineage` prints."""
    import json as json_

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from kd_core.cli import app
    from kd_core.tracking.registry import LINEAGE_TAG, VERSION_TAGS

    project, cfg, _ = run
    client = MlflowClient()
    version = client.get_model_version_by_alias("kd-student", "champion")
    assert set(version.tags) <= set(VERSION_TAGS) and len(version.tags) <= 10, version.tags
    lineage = json_.loads(client.get_run(version.run_id).data.tags[LINEAGE_TAG])
    data = [k for k in lineage if k.startswith("kd.dvc.data.")]
    assert data and any(k.startswith("kd.dvc.model.") for k in lineage) and "kd.eval_prompts.pinned" in lineage
    out = CliRunner().invoke(app, ["lineage", "kd-student@champion"])
    assert out.exit_code == 0, (out.output, out.exception)
    assert all(f"{k.removeprefix('kd.dvc.')}: {lineage[k]}" in out.stdout for k in data), out.stdout


# ------------------------------------------------------------------------------------------------ item 6
def test_dvc_summary_is_a_few_numbers_per_model():
    from kd_core.stages.evaluate import summary

    params = tiny_params()
    params["data"]["eval_sets"] = {"pinned": {"path": "data/eval/pinned.jsonl"}, "dolly_test": {"path": "d.jsonl"}}
    params["evaluation"]["eval_sets"] = ["test", "pinned", "dolly_test"]
    params["tracking"]["champion"]["metric"] = "pinned/rougeL_sampled_mean"
    metrics = {f"{s}/{k}{q}": 12.3456 for s in params["evaluation"]["eval_sets"]
               for k in ("rougeL_sampled", "exact_match_sampled") for q in ("_mean", "_std", "_ci_low", "_ci_high")}
    metrics |= {f"{s}/{k}": 7.0 for s in params["evaluation"]["eval_sets"] for k in ("rougeL_greedy", "distinct_1")}
    metrics |= {"val/ppl": 3.14159, "val/loss": 1.1, "test/top1_agreement": 0.61234, "parameters": 1000}
    assert summary(parse_config(params), metrics) == {
        "test": {"rougeL": 12.35}, "pinned": {"rougeL": 12.35, "greedy": 7.0}, "dolly_test": {"rougeL": 12.35},
        "val_ppl": 3.142, "top1": 0.612}
    params["tracking"]["champion"]["metric"] = "dolly_test/exact_match_sampled_mean"  # not in the summary: added
    assert summary(parse_config(params), metrics)["dolly_test"] == {"rougeL": 12.35, "greedy": 7.0,
                                                                    "exact_match_sampled_mean": 12.3456}


@pytest.mark.slow
def test_report_has_a_section_per_eval_set(run):
    project, cfg, paths = run
    report = (project / paths.reports / "compare.md").read_text(encoding="utf-8")
    data = json.loads((project / paths.reports / "compare.json").read_text())
    for set_name in cfg.evaluation.eval_sets:
        assert f"## Eval set `{set_name}`" in report
        assert f"## Paired comparison with the SFT student ({set_name} prompts, bootstrap over prompts)" in report
        assert {p["model"] for p in data["eval_sets"][set_name]["paired_vs_sft"]} == {"teacher", "fkl"}
    assert data["paired_set"] == "pinned" and data["paired_vs_sft"] == data["eval_sets"]["pinned"]["paired_vs_sft"]


@pytest.mark.slow
def test_dvc_metrics_fit_a_terminal_and_repro_dry_works_after_the_run(run):
    project, cfg, paths = run
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", COLUMNS="400")

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                              timeout=300)

    summary = json.loads((project / paths.metrics("fkl")).with_name("fkl.summary.json").read_text())
    assert set(summary) == {"test", "pinned", "val_ppl", "top1"}
    assert summary["test"].keys() == {"rougeL"} and summary["pinned"].keys() == {"rougeL", "greedy"}  # champion's set
    assert json.loads((project / paths.metrics("fkl")).read_text())["pinned/rougeL_sampled_mean"] == \
        pytest.approx(summary["pinned"]["rougeL"], abs=0.005)  # the full file stays as it was
    shown = dvc("metrics", "show")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert sum(".summary.json" in line for line in lines) == 1 + len(cfg.students), shown.stdout
    assert max(map(len, lines)) <= MAX_METRICS_LINE, shown.stdout

    dry = dvc("repro", "--dry")
    assert dry.returncode == 0 and "Data and pipelines are up to date" in dry.stdout, dry.stdout + dry.stderr
    params = _params()
    params["students"]["fkl"]["temperature"] = 2.0  # a stale student: the dry run lists its stages
    write_params(project, params)
    try:
        dry = dvc("repro", "--dry")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "Running stage 'distill@fkl'" in dry.stdout and "Running stage 'distill@sft'" not in dry.stdout
    finally:
        write_params(project, _params())
