"""The pipeline's stages, each declared once: name, whether it runs per model, the data it reads, the params it
depends on, what it writes. Each stage is a plain function in the module of the same name
(`kd_core/stages/<name>.py`): `fn(cfg, paths)`, or `fn(cfg, paths, key)` for a per-model stage.

The CLI (`kd stage NAME [--model KEY]`), the Prefect flow (`flows/pipeline.py`, which expands the declarations
into one task per stage and key, ordered by what each reads and writes: `kd_core.pipeline.dag`) and `dvc.yaml`
(generated from them: `kd dvc-yaml`, see `kd_core.pipeline.dvcfile`) all follow from `STAGES`. A stage runs through
`kd_core.pipeline.one_stage.run_stage` (the tracking store checked, the run folder locked). A new stage is one
declaration here plus its module.

Paths and params use dvc.yaml's template syntax: `${run_dir}`, `${teacher.name}`, and for per-model stages
`${key}` (the student, model or transfer set) and `${item.<field>}` (its settings).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

# what the KEY of a per-model stage names: a student, any model (the teacher too), or a transfer set
Per = Literal["student", "model", "transfer_set"]


@dataclass(frozen=True)
class Out:
    """An output: `cache=False` keeps it out of the DVC cache (small JSON read by people and tools);
    `persist=True` keeps it when the stage reruns (the stage itself decides whether it is still current)."""

    path: str
    cache: bool = True
    persist: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    per: Per | None = None
    deps: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    outs: tuple[Out, ...] = ()
    metrics: tuple[str, ...] = ()
    doc: str = ""
    # whether the stage does work for a key (None: always); where it does not (a student without post-distillation
    # fine-tuning or without a teacher cache) it still runs, to write its outputs (a hard link, a manifest) and
    # keep the DVC pipeline whole, but the flow runs it inline, as no Prefect task
    applies: Callable[..., bool] | None = None

    def works_for(self, cfg, key: str | None) -> bool:
        """Whether the stage does work for `key` under `cfg` (`applies`; always without one)."""
        return self.applies is None or self.applies(cfg, key)

    @property
    def function(self) -> Callable[..., dict]:
        """The stage function (its module is imported on first use: `kd --help` stays light)."""
        return getattr(importlib.import_module(f"kd_core.stages.{self.name}"), self.name)

    @property
    def module_file(self) -> str:
        return f"kd_core/stages/{self.name}.py"


R = "${run_dir}"
# the project's data folder: local data files and eval sets live here, so that DVC sees a file's content change
# (dvc.yaml cannot depend on a path that only some configs name: data.path is optional)
DATA_DIR = "data"
DECLARATIONS = (
    Stage("prepare", doc="load, validate and split the data; the unlabeled prompts; eval sets; the run's tokenizer",
          deps=(DATA_DIR,), params=("data", "tokenizer", "teacher.model"),
          outs=(Out(f"{R}/data/train.jsonl"), Out(f"{R}/data/val.jsonl"), Out(f"{R}/data/test.jsonl"),
                Out(f"{R}/data/unlabeled.jsonl"), Out(f"{R}/data/eval"), Out(f"{R}/data/report.json", cache=False),
                Out(f"{R}/tokenizer"))),
    Stage("train_teacher", doc="teacher SFT (full or LoRA), or its checkpoint as is",
          deps=(f"{R}/data/train.jsonl", f"{R}/tokenizer"), params=("seed", "teacher", "tokenizer"),
          outs=(Out(f"{R}/models/${{teacher.name}}"), Out(f"{R}/train_info/${{teacher.name}}.json", cache=False))),
    Stage("transfer", per="transfer_set", doc="a teacher-generated transfer set (SeqKD data) over the train and/or "
          "unlabeled prompts",
          deps=(f"{R}/models/${{item.source}}", f"{R}/data/train.jsonl", f"{R}/data/unlabeled.jsonl", f"{R}/tokenizer"),
          params=("transfer_sets.${key}", "evaluation.generation.batch_size"),
          outs=(Out(f"{R}/data/${{key}}.jsonl"),)),
    Stage("cache_teacher", per="student", doc="the teacher's top-k log-probs over the student's training data "
          "(a manifest only when students.<name>.teacher_cache is off)",
          deps=(f"{R}/models/${{item.teacher}}", f"{R}/data/${{item.train_data}}.jsonl", f"{R}/tokenizer"),
          params=("students.${key}", "data.template", "tokenizer"),
          outs=(Out(f"{R}/teacher_cache/${{key}}", persist=True),),
          applies=lambda cfg, key: cfg.students[key].teacher_cache.enabled),
    Stage("distill", per="student", doc="train the student with its method",
          deps=(f"{R}/models/${{item.teacher}}", f"{R}/teacher_cache/${{key}}", f"{R}/data/${{item.train_data}}.jsonl",
                f"{R}/tokenizer"),
          params=("seed", "students.${key}", "tokenizer"),
          outs=(Out(f"{R}/distilled/${{key}}"), Out(f"{R}/train_info/${{key}}.distill.json", cache=False))),
    Stage("finetune", per="student", doc="post-distillation fine-tuning (or the distilled model as is)",
          deps=(f"{R}/distilled/${{key}}", f"{R}/train_info/${{key}}.distill.json", f"{R}/data/train.jsonl",
                f"{R}/tokenizer"),
          params=("seed", "students.${key}"),
          outs=(Out(f"{R}/models/${{key}}"), Out(f"{R}/train_info/${{key}}.json", cache=False)),
          applies=lambda cfg, key: cfg.students[key].finetune.enabled),
    Stage("evaluate", per="model", doc="generation metrics, validation loss, agreement with the teacher",
          deps=(f"{R}/models/${{key}}", f"{R}/models/${{teacher.name}}", f"{R}/data/val.jsonl", f"{R}/data/test.jsonl",
                f"{R}/data/eval", f"{R}/tokenizer"),
          params=("evaluation",),
          # every metric in <model>.json; `dvc metrics show` prints the short summary (a line per model)
          outs=(Out(f"{R}/generations/${{key}}"), Out(f"{R}/metrics/${{key}}.json", cache=False)),
          metrics=(f"{R}/metrics/${{key}}.summary.json",)),
    Stage("register", doc="register every model in MLflow; the champion rule",
          deps=(f"{R}/metrics", f"{R}/train_info"), params=("tracking",),
          outs=(Out(f"{R}/registry.json", cache=False),)),
    Stage("compare", doc="the registered versions side by side: report and plots (a served teacher's row: its "
          "metrics)",
          deps=(f"{R}/registry.json", f"{R}/metrics/${{teacher.name}}.json"), outs=(Out(f"{R}/reports", cache=False),)),
)
STAGES: dict[str, Stage] = {s.name: s for s in DECLARATIONS}


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (allowed: {', '.join(STAGES)})") from None


def stage_keys(stage: Stage, cfg) -> list[str]:
    """The keys a per-model stage runs for (students in teacher-assistant order; the teacher first for
    `model`); [] for a stage that runs once."""
    if stage.per == "student":
        return cfg.chain_order()
    if stage.per == "model":
        return [cfg.teacher.name, *cfg.chain_order()]
    if stage.per == "transfer_set":
        return list(cfg.transfer_sets)
    return []


def check_key(stage: Stage, cfg, key: str | None) -> None:
    """A KeyError naming the allowed keys when `key` does not fit the stage (or is missing / superfluous)."""
    if stage.per is None:
        if key is not None:
            raise KeyError(f"stage {stage.name!r} runs once for the whole run: it takes no --model")
        return
    allowed = stage_keys(stage, cfg)
    if key is None:
        raise KeyError(f"stage {stage.name!r} needs --model (one of: {', '.join(allowed) or 'none configured'})")
    if key not in allowed:
        what = {"student": "student", "model": "model", "transfer_set": "transfer set"}[stage.per]
        raise KeyError(f"stage {stage.name!r}: no {what} named {key!r} (allowed: {', '.join(allowed) or 'none'})")

