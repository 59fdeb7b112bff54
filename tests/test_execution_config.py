"""The `execution` section (kd_core/config/execution.py) and what `kd validate` asks the cluster about it
(kd_core/pipeline/cluster/check.py): one-line errors naming the key and the allowed values; no cluster needed."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from kd_core.pipeline.cluster.check import resource_problems
from kd_core.config import ConfigError, parse_config
from tests.conftest import tiny_params, write_params


def _execution(**execution) -> dict:
    return tiny_params(execution=execution)


def test_default_is_local_and_where_a_stage_runs():
    cfg = parse_config(tiny_params())
    assert cfg.execution.engine == "local" and cfg.execution.on_ray("distill", "fkl") is None
    cfg = parse_config(_execution(engine="ray", stages={"distill": {"workers": 2}, "distill@sft": {"workers": 3},
                                                        "evaluate": {"workers": 2, "gpus_per_worker": 0.5}}))
    assert cfg.execution.on_ray("distill", "fkl").workers == 2
    assert cfg.execution.on_ray("distill", "sft").workers == 3  # the student's own entry first
    assert cfg.execution.on_ray("finetune", "fkl") is None
    assert cfg.fingerprint() == parse_config(tiny_params()).fingerprint()  # where stages run changes no output
    local = parse_config(_execution(engine="local", stages={"distill": {"workers": 2}}))
    assert local.execution.on_ray("distill", "fkl") is None


@pytest.mark.parametrize("execution, expected", [
    ({"engine": "slurm"}, "execution.engine: Input should be 'local' or 'ray'"),
    ({"stages": {"prepare": {}}}, "execution.stages: 'prepare': not a stage that runs on Ray (allowed: train_teacher, "
                                  "distill, finetune, transfer, cache_teacher, evaluate, or <stage>@<key>)"),
    ({"stages": {"distill@nope": {}}}, "execution.stages.distill@nope: distill has no key 'nope' (allowed: sft, fkl)"),
    ({"stages": {"distill": {"workers": 0}}}, "execution.stages.distill.workers: Input should be greater than or "
                                              "equal to 1"),
    ({"stages": {"distill": {"accelerator_type": "A100"}}},
     "execution.stages.distill.accelerator_type: 'A100' needs gpus_per_worker > 0"),
    ({"stages": {"distill": {"workers": "2"}}}, "execution.stages.distill.workers: Input should be a valid integer"),
])
def test_bad_execution_names_the_key(execution, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(_execution(**execution))
    assert expected in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_stage_runs_on_ray_or_under_a_launcher_not_both():
    params = _execution(engine="ray", stages={"distill@fkl": {"workers": 2}})
    params["students"]["fkl"]["training"] = dict(params["students"]["fkl"]["training"],
                                                 launcher={"kind": "torchrun", "nproc_per_node": 2})
    with pytest.raises(ConfigError, match=r"execution.stages.distill: runs on Ray, but students.fkl.training.launcher "
                                          r"is set too \(allowed: one of them\)"):
        parse_config(params)
    params["execution"]["stages"] = {"distill@sft": {"workers": 2}}  # another student on Ray: no conflict
    parse_config(params)


def test_resources_no_node_offers_are_named():
    cfg = parse_config(_execution(engine="ray", stages={
        "distill": {"workers": 3, "cpus_per_worker": 1}, "evaluate": {"workers": 1, "cpus_per_worker": 4},
        "cache_teacher": {"gpus_per_worker": 1, "accelerator_type": "H100"},
        "transfer": {"workers": 2, "gpus_per_worker": 1}}))
    nodes = [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0}]
    assert resource_problems(cfg.execution, nodes) == [
        "execution.stages.cache_teacher: no node offers one worker's resources (1 CPU, 1 GPU, accelerator H100); "
        "the nodes offer: 2 CPU, 0 GPU; 8 CPU, 1 GPU (A100)",
        "execution.stages.transfer.workers: 2 workers asked, the nodes hold 1 at once (allowed: 1 .. 1; the nodes "
        "offer: 2 CPU, 0 GPU; 8 CPU, 1 GPU (A100))",
    ]  # distill: 2 + 8 workers of 1 CPU fit; evaluate: the second node holds 2 of 4 CPUs
    assert resource_problems(cfg.execution, nodes[:1])[0].startswith("execution.stages.distill.workers: 3 workers "
                                                                     "asked, the nodes hold 2 at once")


def test_kd_validate_reports_a_cluster_that_does_not_answer(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from kd_core.cli import app

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, _execution(engine="ray", ray_address=f"127.0.0.1:{port}", stages={"distill": {}}))
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: params.yaml: execution.ray_address: no Ray cluster answers at "
                                     f"'127.0.0.1:{port}' ([Errno 111] Connection refused); start it (`ray start "
                                     f"--head`), fix the address, or set it to null for a local Ray")
    write_params(tmp_path, _execution(engine="ray", stages={"distill": {"workers": 64}}))  # a local Ray: this machine
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 2 and "execution.stages.distill.workers: 64 workers asked" in result.stderr
