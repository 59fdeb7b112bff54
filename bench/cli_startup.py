"""CLI start-up (issue 16): `kd --help`, `kd validate`, `kd stage prepare` and each stage's start-up.

    .venv/bin/python bench/cli_startup.py [-n 5] [--tree /path/to/another/checkout] [--out figures.json]
    .venv/bin/python bench/cli_startup.py --repro [--runs 1]

Runs in a scratch project folder (a temp dir holding the test suite's tiny params, `tests/conftest.py`), so no
run folder of the checkout is touched. Every figure is the median wall time of `-n` fresh processes, measured
from just before the process starts:

- `kd --help`, `kd validate`: the whole process;
- `kd stage prepare`: the whole process, the stage's work on the tiny config included;
- start-up of each stage: process start until the stage function is called (`kd stage NAME [--model KEY]` with
  the stage function replaced by a probe that imports the stage's module, as `Stage.function` does, stamps the
  time and exits): the CLI, the config, the run-folder lock and the stage module's imports (imports a stage makes
  inside its function, only on the path that needs them, are not in it);
- `kd stage cache_teacher` for a student without a teacher cache (a manifest only): the whole process;
- and which of torch / transformers / mlflow / prefect / dvc each of `kd --help` and `kd validate` imported.

`--tree` runs the same commands on another copy of the code (e.g. `git archive HEAD | tar -x -C /tmp/before`)
with the same interpreter and packages: before/after within one run, the trees taking turns (A B A B ...).

`--repro`: the whole tiny pipeline (the suite's tiny params) two ways, each in a fresh scratch project (git + DVC,
its own MLflow store and Prefect home): `kd run` (one process, Prefect's temporary server, the flow driving DVC)
and `dvc repro` (one `kd stage` process per stage instance, each timed by a `kd` shim on DVC's PATH: the whole
process, its start-up and the stage function); `--runs` rounds, the order reversed every other round.

Prints the load average (shared machine).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
KD = [str(Path(sys.executable).with_name("kd"))]
HEAVY = ("torch", "transformers", "mlflow", "prefect", "dvc")
# the probe's key for each per-model stage (the tiny params' students, teacher and the transfer set added below)
KEYS = {"transfer": "gen", "cache_teacher": "fkl", "distill": "fkl", "finetune": "fkl", "evaluate": "fkl"}


def probe(argv: list[str]) -> None:
    """`kd stage ...` in this process, the stage function replaced: import its module, print the time, exit."""
    from kd_core.stages import Stage

    def stamp(self: Stage):
        importlib.import_module(f"kd_core.stages.{self.name}")
        print(f"PROBE {time.time():.6f}", flush=True)
        os._exit(0)

    Stage.function = property(stamp)  # type: ignore[assignment]
    from kd_core.cli import app

    app(["stage", *argv])


def timed(argv: list[str]) -> None:
    """`kd ARGV` as DVC runs it (through the `kd` shim of `--repro`), the stage function timed: appends the
    process's start-up (until the stage function is called) and the stage function's time to $KD_BENCH_LOG."""
    from kd_core.stages import Stage

    t0, real = float(os.environ["KD_BENCH_T0"]), Stage.function

    def timed_function(self: Stage):
        fn = real.fget(self)

        def wrapper(*args):
            start = time.time()
            try:
                return fn(*args)
            finally:
                with open(os.environ["KD_BENCH_LOG"], "a") as log:
                    log.write(json.dumps({"stage": " ".join(argv), "start_up": start - t0,
                                          "body": time.time() - start}) + "\n")
        return wrapper

    Stage.function = property(timed_function)  # type: ignore[assignment]
    from kd_core.cli import app

    sys.argv = [KD[0], *argv]  # as the `kd` command itself (its fast exit after a stage)
    app(argv)


SHIM = r"""#!/bin/bash
t0=$(date +%s.%N)
KD_BENCH_T0=$t0 {python} {script} timed "$@"
rc=$?
printf '{{"stage": "%s", "process": %.3f}}\n' "$*" "$(echo "$(date +%s.%N) - $t0" | bc)" >> "$KD_BENCH_LOG"
exit $rc
"""


def tiny_params() -> dict:
    sys.path.insert(0, str(REPO))
    from tests.conftest import TINY_PARAMS

    params = copy.deepcopy(TINY_PARAMS)
    params["transfer_sets"] = {"gen": {"source": "teacher"}}  # so that the transfer stage has a key
    return params


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.time()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stderr[-2000:]}")
    stamps = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    return (float(stamps[0]) - t0 if stamps else wall), out.stdout


def imported(args: list[str], cwd: Path, env: dict) -> list[str]:
    """The heavy packages that `kd ARGS` has imported when it exits."""
    code = ("import sys, atexit\n"
            f"atexit.register(lambda: print('MODULES', *[m for m in {HEAVY!r} if m in sys.modules]))\n"
            f"sys.argv = ['kd', *{args!r}]\n"
            "from kd_core.cli import app\napp()\n")
    _, out = run([sys.executable, "-c", code], cwd, env)
    return next(line.split()[1:] for line in out.splitlines() if line.startswith("MODULES"))


def measure(trees: dict[str, Path], work: Path, n: int) -> dict[str, dict]:
    """Every figure for every tree, the trees taking turns within each repetition (a drifting load hits both)."""
    from kd_core.stages import DECLARATIONS  # the stage names (the same in every tree)

    me = [sys.executable, str(Path(__file__).resolve()), "probe"]
    commands = {"kd --help": ([*KD, "--help"], n), "kd validate": ([*KD, "validate"], n)}
    for stage in DECLARATIONS:
        key = ["--model", KEYS.get(stage.name, "fkl")] if stage.per else []
        commands[f"start-up {stage.name}"] = ([*me, stage.name, *key], n)
    commands["kd stage prepare"] = ([*KD, "stage", "prepare"], max(1, n // 2 + 1))
    # a stage with no work for its key (the tiny students have no teacher cache): the whole process
    commands["kd stage cache_teacher (no cache)"] = ([*KD, "stage", "cache_teacher", "--model", "fkl"], n)
    envs = {label: dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            for label, tree in trees.items()}
    fig: dict[str, dict] = {label: {} for label in trees}
    for name, (cmd, reps) in commands.items():
        walls: dict[str, list[float]] = {label: [] for label in trees}
        for _ in range(reps):
            for label, env in envs.items():
                walls[label].append(run(cmd, work, env)[0])
        for label in trees:
            fig[label][name] = statistics.median(walls[label])
    for label, env in envs.items():
        fig[label]["imports of kd --help"] = imported(["--help"], work, env)
        fig[label]["imports of kd validate"] = imported(["validate"], work, env)
    return fig


def repro_pair(runs: int, trees: dict[str, Path], params_file: Path | None = None) -> None:
    """Wall time of `kd run` and of `dvc repro` on the tiny params (or `params_file`, e.g. the default
    params.yaml), each in its own fresh scratch project (the code and dvc.yaml of the tree measured)."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import TINY_PARAMS, dvc_project

    bin_dir = Path(sys.executable).parent
    for label, tree in trees.items():
        times: dict[str, list[float]] = {"kd run": [], "dvc repro": []}
        for i in range(runs):
            for what in (list(times) if i % 2 == 0 else list(times)[::-1]):
                with tempfile.TemporaryDirectory(prefix="kd-repro-") as tmp:
                    work = Path(tmp)
                    params = yaml.safe_load(params_file.read_text()) if params_file else copy.deepcopy(TINY_PARAMS)
                    dvc_project(work, params)
                    shutil.copy(tree / "dvc.yaml", work / "dvc.yaml")
                    shutil.rmtree(work / "kd_core")
                    shutil.copytree(tree / "kd_core", work / "kd_core", ignore=shutil.ignore_patterns("__pycache__"))
                    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(tree),
                               PREFECT_HOME=str(work / ".prefect"), DVC_SITE_CACHE_DIR=str(work / ".dvc-site-cache"),
                               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
                    cmd = [*KD, "run"] if what == "kd run" else [str(bin_dir / "dvc"), "repro"]
                    if what == "dvc repro":  # `kd` on DVC's PATH: a shim that times each stage process
                        (work / ".shim").mkdir()
                        (work / ".shim" / "kd").write_text(SHIM.format(python=sys.executable, script=__file__))
                        (work / ".shim" / "kd").chmod(0o755)
                        env.update(PATH=f"{work / '.shim'}{os.pathsep}{env['PATH']}", KD_BENCH_LOG=str(work / "t.jsonl"))
                    wall, _ = run(cmd, work, env)
                    if what == "dvc repro":
                        breakdown: dict[str, dict] = {}
                        for line in (work / "t.jsonl").read_text().splitlines():
                            row = json.loads(line)
                            breakdown.setdefault(row.pop("stage").removeprefix("stage "), {}).update(row)
                    times[what].append(wall)
                    print(f"{label} {what}: {wall:.1f} s", flush=True)
        kd, dvc = (statistics.median(times[k]) for k in ("kd run", "dvc repro"))
        print(f"{label}: median kd run {kd:.1f} s, dvc repro {dvc:.1f} s (one process per stage): "
              f"dvc repro / kd run = {dvc / kd:.2f}")
        print(f"{label}, the last dvc repro's stage processes (s): process = start-up + stage function + exit")
        for name, row in breakdown.items():
            print(f"  {name:<28} process {row.get('process', 0):6.1f}  start-up {row.get('start_up', 0):5.1f}  "
                  f"stage function {row.get('body', 0):6.1f}")
        total = {k: sum(r.get(k, 0) for r in breakdown.values()) for k in ("process", "start_up", "body")}
        print(f"  {'all ' + str(len(breakdown)) + ' processes':<28} process {total['process']:6.1f}  start-up "
              f"{total['start_up']:5.1f}  stage function {total['body']:6.1f}; DVC itself (the rest of dvc repro) "
              f"{times['dvc repro'][-1] - total['process']:.1f}")


def main() -> None:
    if sys.argv[1:2] == ["probe"]:
        return probe(sys.argv[2:])
    if sys.argv[1:2] == ["timed"]:
        return timed(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=5, help="processes per figure (the median is printed)")
    ap.add_argument("--tree", type=Path, help="another copy of the code to measure in the same run (before)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--repro", action="store_true", help="instead: the tiny pipeline by `kd run` and `dvc repro`")
    ap.add_argument("--runs", type=int, default=1, help="with --repro: pairs of runs")
    ap.add_argument("--params", type=Path, help="with --repro: this params file instead of the tiny params")
    args = ap.parse_args()
    load0 = os.getloadavg()
    if args.repro:
        repro_pair(args.runs, ({"before": args.tree.resolve()} if args.tree else {}) | {"after": REPO},
                   args.params.resolve() if args.params else None)
        load1 = os.getloadavg()
        print(f"load average (1 min) before / after: {load0[0]:.2f} / {load1[0]:.2f}; {os.cpu_count()} CPUs")
        return
    with tempfile.TemporaryDirectory(prefix="kd-startup-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
        (work / "data").mkdir()
        trees = ({"before": args.tree.resolve()} if args.tree else {}) | {"after": REPO}
        results = measure(trees, work, args.n)
    load1 = os.getloadavg()
    rows = sorted({k for r in results.values() for k in r}, key=list(results[list(results)[-1]]).index)
    print(f"{'':<26}" + "".join(f"{label:>16}" for label in results))
    for key in rows:
        cells = [results[label].get(key) for label in results]
        print(f"{key:<26}" + "".join(f"{c:>15.2f}s" if isinstance(c, float) else f"{' '.join(c) or '-':>16}"
                                     for c in cells))
    print(f"load average (1 min) before / after: {load0[0]:.2f} / {load1[0]:.2f}; {os.cpu_count()} CPUs; "
          f"n = {args.n} (kd stage prepare: {max(1, args.n // 2 + 1)})")
    if args.out:
        args.out.write_text(json.dumps({"load": [load0[0], load1[0]], **results}, indent=2))


if __name__ == "__main__":
    main()
