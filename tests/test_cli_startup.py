"""A light CLI (issue 16): `kd --help` and `kd validate` import no torch, transformers, MLflow, Prefect or DVC,
nor any stage module or the method registry; params are checked against light name tables
(`kd_core.config.methods`, `kd_core.config.divergence_params`, `ArchConfig.arch`), which these tests keep equal to the
registries behind them. Speed figures: bench/cli_startup.py and docs/performance.md (no timing here)."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from kd_core.config import ArchConfig
from kd_core.config.methods import METHOD_SPECS
from kd_core.config.divergence_params import DIVERGENCE_PARAMS
from tests.conftest import TINY_MODEL, TINY_TRAINING, tiny_params, write_params

# what the light path must not import: the heavy stack, the stage modules, the method and divergence code
HEAVY = ("torch", "transformers", "mlflow", "prefect", "dvc", "kd_core.methods", "kd_core.losses.divergences",
         "kd_core.tracking.runs", "kd_core.tracking.registry")


def _imported_by_kd(args: list[str], cwd) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `kd ARGS` in a fresh interpreter; the heavy modules (and stage modules) it had imported at exit."""
    code = ("import atexit, sys\n"
            f"heavy = {HEAVY!r}\n"
            "atexit.register(lambda: print('IMPORTED', sorted(m for m in sys.modules if m in heavy "
            "or m.startswith('kd_core.stages.'))))\n"
            f"sys.argv = ['kd', *{args!r}]\n"
            "from kd_core.cli import app\n"
            "app()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("IMPORTED"))
    return out, eval(line.removeprefix("IMPORTED "))  # a printed list of str


def _every_method_params() -> dict:
    """The tiny params with one student per method (a transfer set for those that train on one)."""
    params = tiny_params(transfer_sets={"gen": {"source": "teacher"}})
    params["students"] = {
        name: {"method": name, "train_data": "gen" if spec.needs_transfer_set else "train", "model": TINY_MODEL,
               "training": TINY_TRAINING}
        for name, spec in METHOD_SPECS.items()}
    params["students"]["kd"].update(divergence="jsd", divergence_args={"beta": 0.3},
                                    method_args={"temperature_scale": "tau_squared"})
    return params


def test_help_imports_nothing_heavy(project):
    out, imported = _imported_by_kd(["--help"], project)
    assert out.returncode == 0 and "validate" in out.stdout, out.stderr
    assert imported == []


def test_validate_imports_nothing_heavy_for_every_method(project):
    write_params(project, _every_method_params())
    out, imported = _imported_by_kd(["validate"], project)
    assert out.returncode == 0, out.stderr
    assert imported == []
    assert '"method": "progressive"' in out.stdout


def test_validate_errors_stay_light(project):
    params = tiny_params()
    params["students"]["fkl"].update(method="gkd", method_args={"lmbda": 2.0})
    write_params(project, params)
    out, imported = _imported_by_kd(["validate"], project)
    assert out.returncode == 2 and "students.fkl.method_args.lmbda" in out.stderr, out.stderr
    assert imported == []


def test_a_stage_that_does_no_work_for_its_key_stays_light(project):
    """`cache_teacher` of a student without a teacher cache writes its manifest only: no torch (DVC runs it for
    every student, one process each). The process ends through `kd stage`'s fast exit: status 0, its output
    written, and the exit handlers ran (the IMPORTED line is printed by one)."""
    write_params(project, tiny_params())
    out, imported = _imported_by_kd(["stage", "cache_teacher", "--model", "fkl"], project)
    assert out.returncode == 0, out.stderr
    assert imported == ["kd_core.stages.cache_teacher"]
    assert (project / "runs/tiny/teacher_cache/fkl/manifest.json").is_file()


def test_prepare_and_the_report_modules_need_no_torch(project):
    """`kd stage prepare` of a config-built teacher trains its BPE tokenizer without torch (transformers' tokenizer
    class only), and the compare stage's modules (the report, its figures, the paired statistics) import no torch:
    under `dvc repro` each is a process of its own."""
    write_params(project, tiny_params())
    out, imported = _imported_by_kd(["stage", "prepare"], project)
    assert out.returncode == 0, out.stderr
    assert (project / "runs/tiny/tokenizer/tokenizer.json").is_file()
    assert "torch" not in imported and "transformers" in imported
    code = ("import sys\nimport kd_core.stages.compare, kd_core.evaluation.compare, kd_core.evaluation.plots\n"
            "print(sorted(m for m in ('torch', 'transformers', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------------------------------------------- no drift
def test_method_registry_names_the_same_methods_as_the_specs():
    from kd_core.methods import METHODS

    assert set(METHODS) == set(METHOD_SPECS)
    for name, cls in METHODS.items():
        spec = METHOD_SPECS[name]
        assert cls.Args is spec.Args and cls.needs_teacher == spec.needs_teacher, name
        assert cls.reads_teacher_cache == spec.reads_teacher_cache and cls.default_divergence == spec.default_divergence


def test_divergence_registry_names_the_same_divergences_as_the_catalog():
    from kd_core.losses.divergences import DIVERGENCES

    built_in = {name: d for name, d in DIVERGENCES.items() if d.fn.__module__ == "kd_core.losses.divergences"}
    assert set(built_in) == set(DIVERGENCE_PARAMS)
    for name, d in built_in.items():
        assert d.params == DIVERGENCE_PARAMS[name], name
    for name, (divergence, args) in ((n, s.default_divergence) for n, s in METHOD_SPECS.items()):
        assert divergence in DIVERGENCE_PARAMS and set(args) <= set(DIVERGENCE_PARAMS[divergence]), name


@pytest.mark.parametrize("arch", typing.get_args(ArchConfig.model_fields["arch"].annotation))
def test_every_arch_params_allow_builds_that_arch(arch):
    from kd_core.models.build import build_from_config

    class Tokenizer:  # what build_from_config reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return 64

    model = build_from_config(ArchConfig(arch=arch, n_layer=1, hidden=16, n_head=2), Tokenizer(), 32, 0)
    assert model.config.model_type == arch
