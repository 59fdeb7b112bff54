"""Set-up shared by the epoch benchmarks (bench/cache_epoch.py, bench/fused_default.py): a scratch folder, a run
folder with data and an untrained teacher, and one-epoch trainings of several students timed in rotation."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import kd_core  # noqa: F401  (offline defaults)
from kd_core.config import load_config
from kd_core.data.tokenize import load_tokenizer
from kd_core.methods import get_method
from kd_core.models.build import make_model
from kd_core.run import RunPaths, load_model, load_train_set, n_positions
from kd_core.pipeline.one_stage import run_stage
from kd_core.teachers.factory import load_cache
from kd_core.teachers.source import CachedTeacher, LiveTeacher
from kd_core.training.trainer import train


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder (removed afterwards) holding the MLflow store unless MLFLOW_TRACKING_URI is set."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def one_epoch_student(params: str, **fields) -> dict:
    """params.yaml's `sft` student (model, training) set to train one epoch, with the teacher and train data of
    the run, updated with `fields` (method, divergence, ...)."""
    base = load_config(params)
    student = base.students["sft"].model_dump(mode="json", include={"model", "training"})
    student["training"] = {**student["training"], "epochs": 1.0, "max_steps": -1}
    return {"teacher": base.teacher.name, "train_data": "train", **student, **fields}


def prepared_run(params: str, tmp: Path, students: dict, **overrides):
    """The config of `params` with `students` and the teacher at its initial weights (`train: false`: its outputs
    do not change the cost), run folder under `tmp`; `prepare` and `train_teacher` run. Returns (cfg, paths)."""
    teacher = load_config(params).teacher.model_dump(mode="json")
    teacher["train"] = False
    cfg = load_config(params, {"run_dir": str(tmp / "run"), "students": students, "teacher": teacher,
                               "transfer_sets": {}, **overrides})
    run_stage("prepare", cfg)
    run_stage("train_teacher", cfg)
    return cfg, RunPaths.of(cfg)


class EpochTimes:
    """One-epoch trainings of every student of `cfg`, interleaved and rotated each round (A B C, B C A, ...),
    each timed in wall-clock and in this process's CPU time (less sensitive to other processes)."""

    def __init__(self, cfg, paths: RunPaths, out: Path):
        self.cfg, self.paths, self.out = cfg, paths, out
        self.tokenizer = load_tokenizer(paths.tokenizer)
        self.dataset, _ = load_train_set(cfg, paths, self.tokenizer)
        self.teacher = load_model(paths, cfg.teacher.name)
        self.names = list(cfg.students)
        self.wall: dict[str, list[float]] = {n: [] for n in self.names}
        self.cpu: dict[str, list[float]] = {n: [] for n in self.names}
        self.final_loss: dict[str, float] = {}
        self.loads: list[float] = []

    def run(self, rounds: int) -> None:
        for r in range(rounds):
            shift = r % len(self.names)
            for name in self.names[shift:] + self.names[:shift]:
                self._one(name, r)

    def _one(self, name: str, round_: int) -> None:
        sc = self.cfg.student(name)
        student = make_model(sc.model, self.tokenizer, n_positions(self.cfg), seed=0)
        method = get_method(sc.method)(sc, sc.method_args)
        cache = (load_cache(self.cfg, self.paths, name, self.dataset, student)
                 if sc.teacher_cache.enabled else None)
        live = None if cache is not None or sc.method == "sft" else LiveTeacher(self.teacher)
        self.loads.append(os.getloadavg()[0])
        w0, c0 = time.perf_counter(), time.process_time()
        result = train(student, self.dataset, self.tokenizer, sc.training, self.out / name, method=method, seed=0,
                       teacher=CachedTeacher(cache) if cache is not None else live, save=False)
        self.wall[name].append(time.perf_counter() - w0)
        self.cpu[name].append(time.process_time() - c0)
        self.final_loss[name] = result.final_loss
        print(f"round {round_}: {name} {self.wall[name][-1]:.1f} s wall, {self.cpu[name][-1]:.1f} s CPU", flush=True)

    def median(self, clock: str, name: str) -> float:
        return statistics.median(getattr(self, clock)[name])

    def paired(self, clock: str, a: str, b: str) -> float:
        """Median over rounds of the ratio a / b within a round (the load is closest within a round)."""
        times = getattr(self, clock)
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    def load_range(self) -> str:
        return f"{min(self.loads):.1f}-{max(self.loads):.1f}"
