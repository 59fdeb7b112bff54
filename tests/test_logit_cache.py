"""Teacher-logit cache: keyed by what produced it (each key change invalidates it, a match is reused, also
across students), read by content per batch, and a distillation on it at k = V follows the live teacher's
loss curve. Also: vocabulary checks (padded teacher rows sliced to the shared vocabulary, other tokenizers
rejected)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from kd_core.teachers import cache as logit_cache
from kd_core.config import ConfigError, TrainingConfig, parse_config
from kd_core.data.tokenize import load_tokenizer, train_bpe_tokenizer
from kd_core.errors import CacheError
from kd_core.teachers.cache import TeacherLogitCache
from kd_core.teachers.cache_key import cache_key, read_manifest, stale_fields
from kd_core.teachers.factory import load_cache
from kd_core.teachers.source import CachedTeacher, LiveTeacher
from kd_core.losses.chunked import chunked_token_divergence
from kd_core.methods import get_method
from kd_core.models.build import ModelError, build_from_config
from kd_core.training.preflight import check_vocab_compatible
from kd_core.run import RunPaths, load_model
from kd_core.run import load_train_set as _train_set
from kd_core.stages.cache_teacher import cache_teacher
from kd_core.stages.distill import distill
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from kd_core.training.trainer import train
from tests.conftest import TINY_MODEL, TINY_TRAINING, copy_pipeline, tiny_params

PAD_ROWS = 3  # the teacher gets padded embedding rows: caches and losses must slice them off


def _cached_student(name: str = "cached", **cache) -> dict:
    return {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl", "model": TINY_MODEL,
            "training": TINY_TRAINING, "teacher_cache": {"enabled": True, "top_k": 16, **cache}}


def _params(tmp, **students) -> dict:
    params = tiny_params(run_dir=str(tmp / "runs" / "tiny"))
    params["students"] = {"fkl": params["students"]["fkl"], **students}
    return params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, empty_stores):
    """A run folder with data, tokenizer and a briefly trained teacher (with padded vocabulary rows)."""
    import mlflow

    tmp = tmp_path_factory.mktemp("cache")
    uri = f"sqlite:///{empty_stores.seed_mlflow(tmp / 'mlflow.db')}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        cfg = parse_config(_params(tmp, cached=_cached_student()))
        paths = RunPaths.of(cfg)
        prepare(cfg, paths)
        train_teacher(cfg, paths)
        teacher = load_model(paths, "teacher")
        teacher.resize_token_embeddings(teacher.get_output_embeddings().weight.shape[0] + PAD_ROWS)
        with torch.no_grad():  # padded rows with large logits: any loss that forgets to slice them is far off
            teacher.get_output_embeddings().weight[-PAD_ROWS:] = 5 * torch.randn(PAD_ROWS, teacher.config.n_embd)
        teacher.save_pretrained(str(paths.model("teacher")))
        yield tmp, cfg, paths
    mlflow.set_tracking_uri(None)


def _cfg(tmp, **students):
    return parse_config(_params(tmp, **students))


def test_cache_key_fields_each_invalidate_and_a_match_is_reused(prepared):
    tmp, cfg, paths = prepared
    info = cache_teacher(cfg, paths, "cached")
    assert info["source"] in ("built", "current")
    key = read_manifest(paths.teacher_cache("cached"))["key"]
    tok = load_tokenizer(paths.tokenizer)
    assert key["vocab_size"] == len(tok) and key["teacher_vocab"] == len(tok) + PAD_ROWS and key["top_k"] == 16
    mtime = (paths.teacher_cache("cached") / logit_cache.TENSORS).stat().st_mtime_ns
    assert cache_teacher(cfg, paths, "cached")["source"] == "current"
    assert (paths.teacher_cache("cached") / logit_cache.TENSORS).stat().st_mtime_ns == mtime  # not rewritten

    manifest = read_manifest(paths.teacher_cache("cached"))

    def stale_after(cfg_):
        return stale_fields(manifest, cache_key(cfg_, paths, "cached"))

    assert stale_after(cfg) == []
    assert stale_after(_cfg(tmp, cached=_cached_student(top_k=8))) == ["top_k"]
    assert stale_after(_cfg(tmp, cached=_cached_student() | {"temperature": 2.0})) == ["temperature"]
    alpaca = _params(tmp, cached=_cached_student())
    alpaca["data"]["template"] = "alpaca"
    assert stale_after(parse_config(alpaca)) == ["template"]
    on_prompt = _cached_student()
    on_prompt["training"] = TINY_TRAINING | {"loss_on_prompt": True}
    assert stale_after(_cfg(tmp, cached=on_prompt)) == ["loss_on_prompt"]
    # the students' own settings that do not change the teacher's outputs keep the cache
    assert stale_after(_cfg(tmp, cached=_cached_student() | {"divergence": "rkl", "alpha": 0.5})) == []

    backup = tmp / "backup"
    for path, field, change in [
        (paths.model("teacher") / "model.safetensors", "teacher_hash", lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\0\0\0\0")),
        (paths.tokenizer / "tokenizer_config.json", "tokenizer_hash", lambda p: p.write_text(p.read_text() + "\n")),
        (paths.split("train"), "data_hash", lambda p: p.write_text(p.read_text() + p.read_text().splitlines()[0] + "\n")),
    ]:
        shutil.copy2(path, backup)
        try:
            change(path)
            assert stale_after(cfg) == [field]
        finally:
            shutil.copy2(backup, path)
    assert stale_after(cfg) == []

    # a stale cache is rebuilt by the stage (and by distill, which calls it)
    cfg8 = _cfg(tmp, cached=_cached_student(top_k=8))
    assert cache_teacher(cfg8, paths, "cached")["source"] == "built"
    assert read_manifest(paths.teacher_cache("cached"))["key"]["top_k"] == 8
    assert cache_teacher(cfg, paths, "cached")["source"] == "built"


def test_same_key_is_shared_across_students_and_disabled_students_get_a_marker(prepared):
    tmp, _, paths = prepared
    cfg = _cfg(tmp, cached=_cached_student(), twin=_cached_student() | {"divergence": "jsd"})
    cache_teacher(cfg, paths, "cached")
    info = cache_teacher(cfg, paths, "twin")
    assert info["source"] == "linked from cached"
    a, b = (paths.teacher_cache(s) / logit_cache.TENSORS for s in ("cached", "twin"))
    assert os.path.samefile(a, b)  # a hard link: no second teacher pass, no second copy
    assert cache_teacher(cfg, paths, "fkl") == {"student": "fkl", "enabled": False}
    assert read_manifest(paths.teacher_cache("fkl")) == {"enabled": False}
    assert not (paths.teacher_cache("fkl") / logit_cache.TENSORS).exists()


def test_rows_are_found_by_content_and_unknown_rows_are_an_error(prepared):
    tmp, cfg, paths = prepared
    cache_teacher(cfg, paths, "cached")
    tok = load_tokenizer(paths.tokenizer)
    ds, _ = _train_set(cfg, paths, tok)
    cache = TeacherLogitCache(paths.teacher_cache("cached"), ds)
    from kd_core.data.tokenize import CausalCollator

    batch = CausalCollator(tok.pad_token_id)([ds[5], ds[2], ds[9]])  # any order
    top_lp, top_ids, tail = cache.rows_for(batch)
    mask = batch["labels"][:, 1:].ne(-100)
    assert top_lp.shape == (int(mask.sum()), 16) and top_ids.dtype == torch.int64
    # the rows are the teacher's top-16 at those positions (over the shared vocabulary, padded rows sliced)
    teacher = load_model(paths, "teacher").eval()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.log_softmax(logits[mask][:, :len(tok)], -1).topk(16, -1)
    torch.testing.assert_close(top_lp, expected.values, rtol=1e-3, atol=1e-3)  # (stored as float16)
    assert (top_ids < len(tok)).all()
    torch.testing.assert_close(tail.exp() + top_lp.exp().sum(-1), torch.ones_like(tail), rtol=1e-5, atol=1e-5)

    other = dict(ds[0])
    other["input_ids"] = list(reversed(other["input_ids"]))
    with pytest.raises(CacheError, match="not in the teacher cache"):
        cache.rows_for(CausalCollator(tok.pad_token_id)([other]))
    with pytest.raises(CacheError, match="examples"):
        TeacherLogitCache(paths.teacher_cache("cached"), type(ds)(ds.examples[:-1]))


def test_config_rejects_the_cache_for_methods_that_need_the_live_teacher(prepared):
    tmp, _, _ = prepared
    gkd = _cached_student() | {"method": "gkd", "divergence": None}
    with pytest.raises(ConfigError, match=r"students\.cached\.teacher_cache\.enabled: method 'gkd' needs the live "
                                          r"teacher.*read by: atkd, kd"):
        _cfg(tmp, cached=gkd)
    with pytest.raises(ConfigError, match=r"students\.cached\.teacher_cache\.top_k"):
        _cfg(tmp, cached=_cached_student(top_k=0))


def test_distill_on_the_cache_at_full_k_follows_the_live_teacher(prepared):
    """Same student, same data order: the loss curve on the cache (k = V, float32 log-probs) equals the live
    teacher's."""
    tmp, cfg, paths = prepared
    tok = load_tokenizer(paths.tokenizer)
    cfg_full = _cfg(tmp, cached=_cached_student(top_k=100_000, logprobs="float32") | {"divergence": "jsd"})
    sc = cfg_full.student("cached")
    ds, _ = _train_set(cfg_full, paths, tok)
    teacher = load_model(paths, "teacher")
    training = TrainingConfig(max_steps=5, learning_rate=3e-3, batch_size=16, warmup_ratio=0.0, logging_steps=1)
    curves = {}
    for mode in ("live", "cache"):
        method = get_method("kd")(sc, sc.method_args)
        student = build_from_config(sc.model.config, tok, 64, seed=0)
        cache = None
        if mode == "cache":
            cache = load_cache(cfg_full, paths, "cached", ds, student)
            assert cache.key["top_k"] == len(tok) + PAD_ROWS  # capped at the teacher's vocabulary
        result = train(student, ds, tok, training, tmp / f"out-{mode}", method=method, seed=0,
                       teacher=LiveTeacher(copy.deepcopy(teacher)) if mode == "live" else CachedTeacher(cache),
                       save=False)
        curves[mode] = [h["loss"] for h in result.history if "loss" in h]
        assert result.teacher_forward_passes == (0 if mode == "cache" else 5 * 16)
    assert len(curves["live"]) == 5
    torch.testing.assert_close(torch.tensor(curves["cache"]), torch.tensor(curves["live"]), rtol=1e-4, atol=1e-5)

    # the stage wiring: distill with the cache never loads the teacher and records k
    info = distill(cfg_full, paths, "cached")
    assert info["teacher_forward_passes"] == 0 and info["teacher_cache_top_k"] == len(tok) + PAD_ROWS


def test_padded_teacher_rows_are_sliced_in_the_live_kd_loss(prepared):
    _, _, paths = prepared
    tok = load_tokenizer(paths.tokenizer)
    teacher = load_model(paths, "teacher")
    batch = {"input_ids": torch.randint(0, len(tok), (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    logits = teacher(**batch).logits
    assert logits.shape[-1] == len(tok) + PAD_ROWS
    student = logits[..., :len(tok)].detach().clone().requires_grad_(True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    div = chunked_token_divergence(student, logits.detach(), mask, "fkl")
    assert div.abs().max() < 1e-5  # equal distributions on the shared vocabulary: the padded rows are ignored


def test_vocabulary_checks_reject_another_tokenizer(tmp_path):
    rows = [f"alpha beta gamma {i} delta" for i in range(50)]
    run_tok = train_bpe_tokenizer(rows, vocab_size=300)
    other_tok = train_bpe_tokenizer([r.upper()[::-1] for r in rows], vocab_size=300)
    from kd_core.config import ArchConfig, ModelSource

    arch = ArchConfig(n_layer=1, hidden=16, n_head=2)
    other = build_from_config(arch, other_tok, 16, seed=0)
    other.resize_token_embeddings(len(run_tok) + 8)  # big enough: only the tokenizer comparison can tell
    other.save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    same = build_from_config(arch, run_tok, 16, seed=0)
    same.save_pretrained(tmp_path / "same")
    run_tok.save_pretrained(tmp_path / "same")
    teacher = build_from_config(arch, run_tok, 16, seed=1)

    check_vocab_compatible(teacher, same, run_tok, ModelSource(checkpoint=str(tmp_path / "same")))
    with pytest.raises(ModelError, match="another tokenizer than the run's.*must share a tokenizer"):
        check_vocab_compatible(teacher, other, run_tok, ModelSource(checkpoint=str(tmp_path / "other")))
    small = build_from_config(arch, run_tok, 16, seed=0)
    small.resize_token_embeddings(len(run_tok) - 5)
    with pytest.raises(ModelError, match=r"student vocabulary \(\d+\) is smaller than the tokenizer's"):
        check_vocab_compatible(None, small, run_tok)


@pytest.mark.slow
def test_dvc_runs_the_cache_stage_before_distill_and_keeps_a_current_cache(project):
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import write_params

    params = tiny_params()
    params["students"] = {"cached": _cached_student()}
    write_params(project, params)
    copy_pipeline(project)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def sh(*cmd):
        return subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True, text=True).stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "core.analytics", "false")
    first = sh("dvc", "repro", "distill@cached")
    assert first.index("Running stage 'cache_teacher@cached'") < first.index("Running stage 'distill@cached'")
    assert '"source": "built"' in first
    tensors = project / "runs/tiny/teacher_cache/cached" / logit_cache.TENSORS
    assert read_manifest(tensors.parent)["encoding"]["top_logprobs"] == "float16"  # the compact format by default
    info = json.loads((project / "runs/tiny/train_info/cached.distill.json").read_text())
    assert info["teacher_forward_passes"] == 0 and info["teacher_cache_top_k"] == 16
    # a student setting that does not key the cache: the stage reruns (params changed) but keeps the cache
    params["students"]["cached"]["training"] = TINY_TRAINING | {"learning_rate": 0.001}
    write_params(project, params)
    second = sh("dvc", "repro", "distill@cached")
    assert "Running stage 'cache_teacher@cached'" in second and '"source": "current"' in second
    assert "Running stage 'distill@cached'" in second
    assert read_manifest(tensors.parent)["key"]["top_k"] == 16  # (a key change rebuilds: tested above)
    assert "Running stage" not in sh("dvc", "repro", "distill@cached")
