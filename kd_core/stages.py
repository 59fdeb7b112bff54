"""The pipeline stages, each a plain function of (validated config, run paths) that returns what it made.

The Prefect flow (`flows/pipeline.py`), `dvc.yaml` (via `kd stage NAME`) and the CLI all call these and
nothing else. Every output lives under `cfg.run_dir` and is written atomically.

    prepare -> train_teacher -> distill(student) -> finetune(student) -> evaluate(model) -> register -> compare
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_core import logit_cache, tracking
from kd_core.config import PipelineConfig, StudentConfig
from kd_core.data.builtin import generate_builtin
from kd_core.data.sources import (DataError, RawRow, check_report, normalize_rows, read_file, read_hub)
from kd_core.data.split import split_rows
from kd_core.data.template import format_prompt
from kd_core.data.tokenize import (IGNORE_INDEX, EncodedDataset, batches, encode_example, encode_prompt, encode_rows,
                                   load_tokenizer, train_bpe_tokenizer)
from kd_core.generation import generate
from kd_core.io import atomic_dir, read_jsonl, write_json_atomic, write_jsonl_atomic
from kd_core.methods import get_method
from kd_core.models import ModelError, count_parameters, load_checkpoint, make_model
from kd_core.preflight import preflight
from kd_core.training import is_main_process, train

log = logging.getLogger("kd")


@dataclass(frozen=True)
class RunPaths:
    """Where every output of a run lives: all under `cfg.run_dir`, one folder per kind of output."""

    root: Path

    @classmethod
    def of(cls, cfg: PipelineConfig) -> RunPaths:
        return cls(Path(cfg.run_dir))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """A split (train / val / test) or a transfer set, by name."""
        return self.data / f"{name}.jsonl"

    def eval_set(self, name: str) -> Path:
        return self.split("test") if name == "test" else self.data / "eval" / f"{name}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, name: str) -> Path:
        """The final model of the teacher or of a student (what is evaluated, registered, and teaches TAs' students)."""
        return self.root / "models" / name

    def distilled(self, student: str) -> Path:
        """A student after distillation, before post-distillation fine-tuning."""
        return self.root / "distilled" / student

    def teacher_cache(self, student: str) -> Path:
        """The teacher's cached top-k log-probs over a student's training data (kd_core/logit_cache.py)."""
        return self.root / "teacher_cache" / student

    def train_info(self, model: str) -> Path:
        return self.root / "train_info" / f"{model}.json"

    def metrics(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.json"

    def generations(self, name: str) -> Path:
        return self.root / "generations" / name

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def _seed(cfg: PipelineConfig, training_seed: int | None) -> int:
    return cfg.seed if training_seed is None else training_seed


def _file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _n_positions(cfg: PipelineConfig) -> int:
    """Positions a model built from a config needs: the longest prompt plus the longest generation."""
    longest = max([cfg.evaluation.generation.max_new_tokens, *cfg.evaluation.exaccerr_lengths,
                   *(t.max_new_tokens for t in cfg.transfer_sets.values())])
    return cfg.tokenizer.max_length + longest


# ----------------------------------------------------------------------------------------------- 1. data
def _load_main_rows(cfg: PipelineConfig):
    d = cfg.data
    if d.source == "builtin":
        raw = (RawRow(r, f"builtin row {i}") for i, r in enumerate(generate_builtin(d.builtin_examples, d.builtin_seed)))
        what = "builtin data"
    elif d.source == "file":
        raw, what = read_file(d.path), str(d.path)
    else:
        raw, what = read_hub(d.hub_name, d.hub_split), f"{d.hub_name}[{d.hub_split}]"
    rows, report = normalize_rows(raw, field_map=d.field_map, max_chars=d.max_chars, template=d.template, id_prefix="row")
    check_report(report, d.max_bad_fraction, what)
    return (rows[: d.max_rows] if d.max_rows else rows), report


def prepare(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Load, validate and split the data; write named eval sets; build the run's tokenizer."""
    rows, report = _load_main_rows(cfg)
    splits = split_rows(rows, cfg.data.split.val_fraction, cfg.data.split.test_fraction, cfg.data.split.seed)
    for name, part in splits.items():
        if not part and (name == "train" or getattr(cfg.data.split, f"{name}_fraction", 1) > 0):
            raise DataError(f"split {name!r} is empty after validation ({len(rows)} valid rows): "
                            f"use more data or change data.split")
    eval_reports = {}
    eval_rows: dict[str, list[dict]] = {}
    for name, es in cfg.data.eval_sets.items():
        raw_rows = list(read_file(es.path))
        erows, erep = normalize_rows(raw_rows, field_map=cfg.data.field_map, max_chars=cfg.data.max_chars,
                                     template=cfg.data.template, id_prefix=name)
        check_report(erep, cfg.data.max_bad_fraction, f"data.eval_sets.{name} ({es.path})")
        if es.filter_field:
            keep = {str(r.values.get("id")) for r in raw_rows if r.values.get(es.filter_field)}
            erows = [r for r in erows if r["id"] in keep]
        eval_rows[name] = erows[: es.limit] if es.limit else erows
        eval_reports[name] = erep.to_dict() | {"written": len(eval_rows[name])}

    # tokenizer: the teacher checkpoint's own, else a BPE trained on the train split
    teacher_src = cfg.teacher.model
    if teacher_src.checkpoint:
        try:
            tok = load_tokenizer(teacher_src.checkpoint, teacher_src.trust_remote_code, gguf_file=teacher_src.gguf_file)
        except (OSError, ValueError) as err:
            path = teacher_src.checkpoint
            missing = path.startswith((".", "/", "~")) and not Path(path).expanduser().exists()
            raise ModelError(f"teacher.model.checkpoint: {path!r} " + ("does not exist" if missing else
                             f"has no tokenizer that loads ({err})")) from None
    else:
        texts = (format_prompt(r, cfg.data.template) + r["response"] for r in splits["train"])
        tok = train_bpe_tokenizer(texts, cfg.tokenizer.vocab_size)
    # rows over tokenizer.max_length stay in the splits; training truncates or drops them (tokenizer.overlong)
    overlong = {name: encode_rows(part, tok, cfg.data.template, cfg.tokenizer.max_length, "drop")[1]
                for name, part in splits.items()}
    if cfg.tokenizer.overlong == "drop" and overlong["train"] == len(splits["train"]):
        raise DataError(f"split 'train': all {overlong['train']} rows are longer than tokenizer.max_length="
                        f"{cfg.tokenizer.max_length} and tokenizer.overlong is 'drop'")
    with atomic_dir(paths.tokenizer) as tmp:
        tok.save_pretrained(str(tmp))

    for name, part in splits.items():
        write_jsonl_atomic(paths.split(name), part)
    with atomic_dir(paths.data / "eval") as tmp:
        for name, erows in eval_rows.items():
            write_jsonl_atomic(tmp / f"{name}.jsonl", erows)
    summary = {"main": report.to_dict(), "eval_sets": eval_reports, "splits": {k: len(v) for k, v in splits.items()},
               "overlong": {"max_length": cfg.tokenizer.max_length, "policy": cfg.tokenizer.overlong, "rows": overlong},
               "data_version": _file_hash(*(paths.split(n) for n in ("train", "val", "test")))}
    write_json_atomic(paths.data / "report.json", summary)
    log.info("prepared data: %s", summary["splits"])
    with tracking.stage_run(cfg, paths.root, "prepare") as _:
        import mlflow
        mlflow.log_params({"data.source": cfg.data.source, "data.version": summary["data_version"]})
        mlflow.log_metrics({f"rows_{k}": v for k, v in summary["splits"].items()} | {"rows_bad": report.total - report.kept}
                           | {f"rows_overlong_{k}": v for k, v in overlong.items()})
        mlflow.log_dict(summary, "data_report.json")
    return summary


def _data_version(paths: RunPaths) -> str:
    return json.loads((paths.data / "report.json").read_text())["data_version"]


def _train_set(cfg: PipelineConfig, paths: RunPaths, tokenizer, split: str = "train", loss_on_prompt: bool = False):
    if not paths.split(split).is_file():
        raise FileNotFoundError(f"{paths.split(split)}: no data {split!r}; run the prepare (or transfer) stage first")
    ds, dropped = encode_rows(read_jsonl(paths.split(split)), tokenizer, cfg.data.template,
                              cfg.tokenizer.max_length, cfg.tokenizer.overlong, loss_on_prompt)
    if len(ds) == 0:
        raise DataError(f"split {split!r}: every example is longer than tokenizer.max_length={cfg.tokenizer.max_length}")
    return ds, dropped


# ----------------------------------------------------------------------------------------------- 2. teacher
def train_teacher(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Supervised fine-tuning of the teacher (full or LoRA), or materialise a given checkpoint as is."""
    tc = cfg.teacher
    tokenizer = load_tokenizer(paths.tokenizer)
    seed = _seed(cfg, tc.training.seed)
    model = make_model(tc.model, tokenizer, _n_positions(cfg), seed)
    preflight(cfg, "train_teacher", model=model, tokenizer=tokenizer, training=tc.training, out_dir=paths.model(tc.name))
    info: dict = {"name": tc.name, "parameters": count_parameters(model), "trained": tc.train, "finetune": tc.finetune}
    with tracking.stage_run(cfg, paths.root, "train_teacher", tc.name, params=tc.model_dump(mode="json")):
        if not tc.train:
            with atomic_dir(paths.model(cfg.teacher.name)) as tmp:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
            info.update(train_time_s=0.0, steps=0)
        else:
            ds, dropped = _train_set(cfg, paths, tokenizer, loss_on_prompt=tc.training.loss_on_prompt)
            if tc.finetune == "lora":
                model = _with_lora(model, tc.lora)
            result = train(model, ds, tokenizer, tc.training, paths.model(cfg.teacher.name), method=get_method("sft")(None),
                           seed=seed, on_log=tracking.log_step, save=tc.finetune == "full")
            if tc.finetune == "lora":  # merge the adapter so the teacher is a plain causal LM
                merged = model.merge_and_unload()
                with atomic_dir(paths.model(cfg.teacher.name)) as tmp:
                    merged.save_pretrained(str(tmp))
                    tokenizer.save_pretrained(str(tmp))
            info.update(train_time_s=result.wall_time_s, steps=result.steps, final_loss=result.final_loss,
                        dropped_overlong=dropped)
        _log_info_metrics(info)
    write_json_atomic(paths.train_info(tc.name), info)
    return info


def _with_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                            target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM"))


def _tracked_stage(cfg: PipelineConfig, paths: RunPaths, stage: str, name: str, params: dict | None = None):
    """The stage's MLflow run. Under `torchrun`/`deepspeed` only rank 0 tracks (and writes train_info): the
    other ranks train alongside it and log nothing."""
    if is_main_process():
        return tracking.stage_run(cfg, paths.root, stage, name, params=params)
    return contextlib.nullcontext()


def _log_info_metrics(info: dict) -> None:
    if not is_main_process():
        return
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def load_model(paths: RunPaths, name: str):
    """A finished model of this run (the teacher or a student acting as teacher assistant)."""
    if not paths.model(name).is_dir():
        raise FileNotFoundError(f"{paths.model(name)}: no model {name!r} yet; run its training stages first")
    return load_checkpoint(paths.model(name))


# ----------------------------------------------------------------------------------------------- 2b. transfer
@torch.inference_mode()
def _mean_logprobs(model, dataset, pad_id: int, batch_size: int = 32) -> list[float]:
    """Mean log-probability of each example's response tokens under `model` (teacher forcing)."""
    out: list[float] = []
    for batch in batches(dataset, pad_id, batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets.ne(IGNORE_INDEX)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += ((lp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


def transfer(cfg: PipelineConfig, paths: RunPaths, set_name: str) -> dict:
    """Generate a transfer set (SeqKD data) with a model over the train prompts: `data/<set_name>.jsonl`."""
    if set_name not in cfg.transfer_sets:
        raise KeyError(f"no transfer set {set_name!r} (transfer_sets: {', '.join(cfg.transfer_sets) or 'none'})")
    ts = cfg.transfer_sets[set_name]
    tokenizer = load_tokenizer(paths.tokenizer)
    model = load_model(paths, ts.source)
    rows = read_jsonl(paths.split("train"))
    prompts = [encode_prompt(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]
    generated, empty, tokens, seconds = [], 0, 0, 0.0
    with tracking.stage_run(cfg, paths.root, "transfer", set_name, params=ts.model_dump()):
        for k in range(ts.n_samples):
            gen = generate(model, tokenizer, prompts, max_new_tokens=ts.max_new_tokens, do_sample=not ts.greedy,
                           temperature=ts.temperature, top_p=ts.top_p, seed=ts.seed + k,
                           batch_size=cfg.evaluation.generation.batch_size)
            tokens, seconds = tokens + gen.new_tokens, seconds + gen.seconds
            for row, text in zip(rows, gen.texts):
                if not text:
                    empty += 1
                    continue
                generated.append(dict(row, response=text, id=f"{row['id']}~{set_name}{k}", generated_by=ts.source))
        if ts.strategy == "confidence" and generated:
            encoded = [encode_example(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in generated]
            usable = [i for i, e in enumerate(encoded) if e is not None]
            scores = dict(zip(usable, _mean_logprobs(model, EncodedDataset([encoded[i] for i in usable]),
                                                     tokenizer.pad_token_id)))
            keep = max(1, round(ts.keep_fraction * len(generated)))
            best = sorted(scores, key=lambda i: -scores[i])[:keep]
            generated = [generated[i] for i in sorted(best)]
        out_rows = (rows if ts.strategy == "augment" else []) + generated
        if not out_rows:
            raise DataError(f"transfer set {set_name!r}: {ts.source!r} generated only empty responses")
        write_jsonl_atomic(paths.split(set_name), out_rows)
        info = {"rows": len(out_rows), "prompts": len(rows), "empty_generations": empty, "generated_tokens": tokens,
                "generation_seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}
        _log_info_metrics(info)
    write_json_atomic(paths.train_info(f"transfer.{set_name}"), info)
    return info


# ----------------------------------------------------------------------------------------------- 3. distill
def distill(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """Train one student with its method against the (frozen) teacher."""
    sc: StudentConfig = cfg.student(student_name)
    tokenizer = load_tokenizer(paths.tokenizer)
    method = get_method(sc.method)(sc, sc.method_args)
    cached = sc.teacher_cache.enabled  # the teacher's top-k log-probs come from teacher_cache/<student>
    live_teacher = method.needs_teacher and not cached
    teacher = load_model(paths, sc.teacher) if live_teacher or sc.model.from_teacher_layers is not None else None
    seed = _seed(cfg, sc.training.seed)
    student = make_model(sc.model, tokenizer, _n_positions(cfg), seed, teacher=teacher)
    preflight(cfg, f"distill {sc.name}", model=student, tokenizer=tokenizer, training=sc.training,
              out_dir=paths.distilled(sc.name), teacher=teacher, student_source=sc.model)
    ds, dropped = _train_set(cfg, paths, tokenizer, sc.train_data, loss_on_prompt=sc.training.loss_on_prompt)
    if cached:
        method.teacher_cache = logit_cache.load_for_training(cfg, paths, sc.name, ds, student)
    info: dict = {"name": sc.name, "method": sc.method, "divergence": sc.divergence if method.needs_teacher else "",
                  "teacher": sc.teacher, "train_data": sc.train_data, "parameters": count_parameters(student),
                  "teacher_cache_top_k": method.teacher_cache.key["top_k"] if cached else 0}
    params = sc.model_dump(mode="json", exclude={"finetune"})
    with _tracked_stage(cfg, paths, "distill", sc.name, params=params):
        result = train(student, ds, tokenizer, sc.training, paths.distilled(sc.name), method=method, seed=seed,
                       teacher=teacher if live_teacher else None, on_log=tracking.log_step)
        info.update(train_time_s=result.wall_time_s, steps=result.steps, final_loss=result.final_loss,
                    teacher_forward_passes=result.teacher_forward_passes, generated_tokens=result.generated_tokens,
                    dropped_overlong=dropped)
        _log_info_metrics(info)
    if is_main_process():
        write_json_atomic(paths.train_info(f"{sc.name}.distill"), info)
    return info


# ----------------------------------------------------------------------------------------------- 4. finetune
def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a model folder (no copy of the weights), falling back to copying across devices."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def finetune(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """Post-distillation fine-tuning (CE at lr × lr_scale); when disabled the distilled model is final."""
    sc = cfg.student(student_name)
    src = paths.distilled(sc.name)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no distilled model; run the distill stage for {sc.name!r} first")
    distill_info = json.loads(paths.train_info(f"{sc.name}.distill").read_text())
    info = dict(distill_info, finetuned=sc.finetune.enabled, finetune_time_s=0.0)
    if not sc.finetune.enabled:
        if is_main_process():
            with atomic_dir(paths.model(sc.name)) as tmp:
                _link_tree(src, tmp)
    else:
        tokenizer = load_tokenizer(paths.tokenizer)
        model = load_checkpoint(src)
        preflight(cfg, f"finetune {sc.name}", model=model, tokenizer=tokenizer, training=sc.training,
                  out_dir=paths.model(sc.name))
        ds, _ = _train_set(cfg, paths, tokenizer, loss_on_prompt=sc.training.loss_on_prompt)
        lr = sc.training.learning_rate * sc.finetune.lr_scale
        with _tracked_stage(cfg, paths, "finetune", sc.name, params=sc.finetune.model_dump()):
            result = train(model, ds, tokenizer, sc.training, paths.model(sc.name), method=get_method("sft")(sc),
                           seed=_seed(cfg, sc.training.seed), epochs=sc.finetune.epochs, learning_rate=lr,
                           on_log=tracking.log_step)
            info.update(finetune_time_s=result.wall_time_s, finetune_steps=result.steps)
    info["train_time_s"] = distill_info["train_time_s"] + info["finetune_time_s"]
    if is_main_process():
        write_json_atomic(paths.train_info(sc.name), info)
    return info


# ----------------------------------------------------------------------------------------------- 5. evaluate
def evaluate(cfg: PipelineConfig, paths: RunPaths, model_name: str) -> dict:
    """Generation metrics on every eval set (greedy and sampled over seeds), validation loss, agreement."""
    from kd_core.evaluation.run import evaluate_model

    model_dir = paths.model(model_name)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no model for {model_name!r}; run its training stages first")
    with tracking.stage_run(cfg, paths.root, "evaluate", model_name):
        metrics = evaluate_model(cfg, paths, model_name, model_dir)
        import mlflow
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, (int, float))})
    write_json_atomic(paths.metrics(model_name), metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- 6. register
def _is_better(new: float, old: float | None, mode: str, min_delta: float) -> bool:
    if old is None:
        return True
    return new > old + min_delta if mode == "max" else new < old - min_delta


def register(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Log every model of the run to MLflow as a transformers model, register it, move `champion`."""
    names = [cfg.teacher.name] + list(cfg.students)
    missing = [n for n in names if not paths.metrics(n).is_file()]
    if missing:
        raise FileNotFoundError(f"no metrics for {missing}: run the evaluate stage first (nothing registered)")
    data_version = _data_version(paths)
    teacher_info = json.loads(paths.train_info(cfg.teacher.name).read_text())
    registered: dict = {"versions": {}}
    for name in names:
        is_teacher = name == cfg.teacher.name
        info = json.loads(paths.train_info(name).read_text())
        metrics = json.loads(paths.metrics(name).read_text())
        sc = None if is_teacher else cfg.student(name)
        teaches = [s.name for s in cfg.students.values() if s.teacher == name]
        role = "teacher" if is_teacher else "assistant" if teaches else "student"
        own_teacher = "" if is_teacher else sc.teacher
        tags = {"kd.role": role, "kd.model": name,
                "kd.method": "teacher-sft" if is_teacher else sc.method,
                "kd.divergence": "" if is_teacher else info.get("divergence", ""),
                "kd.teacher": own_teacher, "kd.root_teacher": cfg.teacher.name,
                "kd.train_data": "train" if is_teacher else sc.train_data,
                "kd.teacher_parameters": str(teacher_info["parameters"]),
                "kd.parameters": str(info["parameters"]), "kd.params_hash": cfg.fingerprint(),
                "kd.data_version": data_version, "kd.run_dir": str(paths.root),
                "kd.finetuned": str(info.get("finetuned", False)).lower()}
        reg_name = cfg.tracking.register_teacher_as if is_teacher else cfg.tracking.registered_model
        numeric = {k.replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, (int, float))}
        numeric |= {"train_time_s": info.get("train_time_s", 0.0), "parameters": info["parameters"]}
        with tracking.stage_run(cfg, paths.root, "register", name):
            import mlflow

            per_prompt = paths.generations(name) / "test.jsonl"
            if per_prompt.is_file():  # per-prompt scores: the champion rule's paired test reads them back
                mlflow.log_artifact(str(per_prompt), artifact_path="eval")
            version = tracking.log_model_and_register(paths.model(name), reg_name, tags, numeric)
        registered["versions"][name] = {"registered_model": reg_name, "version": version}
    registered["champion"] = update_champion(cfg)
    write_json_atomic(paths.registry, registered)
    return registered


def update_champion(cfg: PipelineConfig) -> dict:
    """Move alias `champion` of the student model to the best version by the rule in params."""
    rule = cfg.tracking.champion
    rows = tracking.version_rows(cfg.tracking.registered_model)
    key = rule.metric.replace("@", "_at_")
    scored = [r for r in rows if key in r["metrics"]]
    if not scored:
        return {"moved": False, "reason": f"no version has metric {rule.metric!r}"}
    current = next((r for r in rows if "champion" in r["aliases"]), None)
    best = (max if rule.mode == "max" else min)(scored, key=lambda r: r["metrics"][key])
    old = current["metrics"].get(key) if current else None
    if current is not None and current["version"] == best["version"]:
        return {"moved": False, "version": best["version"], "reason": "already champion"}
    if not _is_better(best["metrics"][key], old, rule.mode, rule.min_delta):
        return {"moved": False, "version": current["version"] if current else None,
                "reason": f"best {best['metrics'][key]:.4g} not better than {old} by > {rule.min_delta}"}
    decision = {"moved": True, "version": best["version"], "metric": rule.metric, "value": best["metrics"][key]}
    if rule.significance is not None and current is not None:
        test = _paired_registry_test(current["run_id"], best["run_id"], cfg.seed)
        if test is None or test["p_value"] >= rule.significance:
            return {"moved": False, "version": current["version"], "paired_test": test,
                    "reason": f"not significant at p < {rule.significance}"}
        decision["paired_test"] = test
    tracking.set_alias(cfg.tracking.registered_model, "champion", best["version"])
    return decision


def _paired_registry_test(old_run: str, new_run: str, seed: int) -> dict | None:
    """Paired bootstrap of two registered versions on the prompts both were evaluated on."""
    import mlflow

    from kd_core.evaluation.stats import paired_bootstrap

    scores = []
    for run_id in (old_run, new_run):
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/test.jsonl")
        except Exception:  # an older version without per-prompt scores
            return None
        scores.append({r["id"]: r.get("rougeL_sampled_mean") for r in read_jsonl(local)})
    ids = [i for i in scores[0] if scores[0][i] is not None and scores[1].get(i) is not None]
    if len(ids) < 2:
        return None
    return paired_bootstrap([scores[0][i] for i in ids], [scores[1][i] for i in ids], seed=seed)


# ----------------------------------------------------------------------------------------------- 7. compare
def compare(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Side-by-side table of registered versions (teacher and students), markdown + JSON + plot."""
    from kd_core.evaluation.compare import build_report

    tracking.setup(cfg)
    return build_report(cfg, paths)


STAGES = {"prepare": prepare, "train_teacher": train_teacher, "transfer": transfer,
          "cache_teacher": logit_cache.cache_teacher, "distill": distill, "finetune": finetune,
          "evaluate": evaluate, "register": register, "compare": compare}
