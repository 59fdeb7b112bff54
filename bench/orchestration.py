"""Orchestration overhead (Prefect + MLflow + DVC) as a share of the default pipeline's wall time (issue 5).

    .venv/bin/python bench/orchestration.py [--params params.yaml] [--dvc] [--server] [-S data.builtin_examples=1000]

Runs the default pipeline once, in this process, exactly as `kd run` does (`flows.pipeline.kd_pipeline`:
a temporary local Prefect server, tasks, MLflow tracking), in a scratch copy of the project (git HEAD
plus the working tree's tracked files) so nothing of the checkout is touched, and measures:

- total: wall time of the flow call, the start of Prefect's temporary server included (as in `kd run`); with
  `--server`, a server started beforehand, as scheduled deployments use, outside the timing;
- stage bodies: wall time inside each stage function (`kd_core.pipeline.one_stage.run_stage`), summed;
- MLflow inside the stage bodies: time in the tracking calls (stage runs opened/closed, params, metrics,
  per-step metrics, artifacts, model logging and registration, registry queries);
- Prefect = total − stage bodies; MLflow as above; their sum is the orchestration share;
- with `--dvc`: DVC's bookkeeping in the same copy: `dvc commit` (hash every stage's deps and outputs, write
  dvc.lock, as `dvc repro` does after running the commands), then a no-op `dvc repro` and `dvc status`.

Prints the figures and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def scratch_copy(dest: Path) -> None:
    """The project's tracked files as they are in the working tree (no runs, stores or caches)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def dvc_bookkeeping(work: Path) -> float:
    """Seconds of DVC's own work for the pipeline the flow ran in `work`: `dvc commit` (what `dvc repro` does
    after running the commands: hash deps and outputs, write dvc.lock) and `dvc status` (the check a no-op
    `dvc repro` makes), for every stage whose deps and outputs exist (the flow does not run e.g. cache_teacher
    when no student uses the cache, and DVC would run it and the stages after it)."""
    from dvc.repo import Repo

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    if not (work / ".git").is_dir():
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    with Repo(str(work)) as repo:
        stages_ = list(repo.index.stages)
        committed = [st.name for st in stages_
                     if all(Path(work, o.def_path).exists() for o in [*st.deps, *st.outs])]
    skipped = [st.name for st in stages_ if st.name not in committed]
    timings = {}
    for label, cmd in (("dvc commit", ["commit", "-f", "-q", *committed]), ("dvc status", ["status", *committed])):
        start = time.perf_counter()
        proc = subprocess.run(dvc + cmd, cwd=work, env=env, capture_output=True, text=True)
        timings[label] = time.perf_counter() - start
        detail = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}" if proc.returncode else (
            proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "up to date")
        print(f"{label} of {len(committed)} stages: {timings[label]:.1f} s ({detail})")
    print(f"  (not committed, deps or outputs missing: {', '.join(skipped) or 'none'})")
    return sum(timings.values())


def start_prefect_server(work: Path) -> subprocess.Popen:
    """A `prefect server` on a free local port, healthy before the timing starts; PREFECT_API_URL points at it."""
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    log = open(work / "prefect-server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            os.environ["PREFECT_API_URL"] = url
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"prefect server did not become healthy: see {work / 'prefect-server.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dvc", action="store_true", help="also time DVC's bookkeeping (dvc commit, no-op repro)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    ap.add_argument("--server", action="store_true",
                    help="run against a Prefect server started beforehand (as scheduled deployments and `kd serve` "
                         "do), not a temporary one started by the flow call")
    ap.add_argument("--dvc-only", type=Path, help="only time DVC's bookkeeping in a kept scratch copy")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[],
                    help="override a params key as `kd run -S` does (e.g. a smaller data set on a loaded machine)")
    args = ap.parse_args()
    if args.dvc_only:
        print(f"DVC bookkeeping: {dvc_bookkeeping(args.dvc_only.resolve()):.1f} s")
        return

    work = Path(tempfile.mkdtemp(prefix="kd-bench-orch-"))
    scratch_copy(work)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)  # DVC (the flow records every stage) needs a git repo
    os.chdir(work)
    sys.path.insert(0, str(work))
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", PREFECT_HOME=str(work / ".prefect"))
    os.environ.pop("PREFECT_API_URL", None)
    # a fresh PREFECT_HOME on a loaded machine can take longer than the default 20 s to start its server
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    server = start_prefect_server(work) if args.server else None

    import mlflow

    import kd_core  # noqa: F401
    from kd_core.pipeline import execute
    from kd_core.tracking import registry, runs, store

    body: dict[str, float] = defaultdict(float)  # stage name -> seconds in its function
    in_mlflow: dict[str, float] = defaultdict(float)  # tracking call -> seconds

    depth = {"mlflow": 0}  # tracking calls nest (log_step -> mlflow.log_metrics): count the outermost only

    @contextlib.contextmanager
    def measure(table: dict, key: str):
        kind = "mlflow" if table is in_mlflow else None
        outer = kind is None or depth[kind] == 0
        if kind:
            depth[kind] += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            if outer:
                table[key] += time.perf_counter() - start
            if kind:
                depth[kind] -= 1

    def timed(table: dict, key: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            with measure(table, key):
                return fn(*a, **kw)
        return wrapper

    stage_run = runs.stage_run

    @contextlib.contextmanager
    def timed_stage_run(*a, **kw):
        with measure(in_mlflow, "stage_run enter"):
            cm = stage_run(*a, **kw)
            run = cm.__enter__()
        try:
            yield run
        except BaseException:
            with measure(in_mlflow, "stage_run exit"):
                if not cm.__exit__(*sys.exc_info()):
                    raise
        else:
            with measure(in_mlflow, "stage_run exit"):
                cm.__exit__(None, None, None)

    runs.stage_run = timed_stage_run
    for module, name in ((runs, "log_step"), (registry, "log_model_and_register"), (registry, "version_rows"),
                         (registry, "set_alias"), (store, "setup")):
        setattr(module, name, timed(in_mlflow, name, getattr(module, name)))
    for name in ("log_metrics", "log_params", "log_artifact", "log_metric", "set_tags"):
        setattr(mlflow, name, timed(in_mlflow, f"mlflow.{name}", getattr(mlflow, name)))
    run_stage = execute.run_stage

    def timed_run_stage(name, *a, **kw):
        with measure(body, name):
            return run_stage(name, *a, **kw)

    execute.run_stage = timed_run_stage

    from flows.pipeline import kd_pipeline

    load0 = os.getloadavg()
    start = time.perf_counter()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.sets)} or None
    kd_pipeline(params_path=args.params, overrides=overrides)
    total = time.perf_counter() - start
    load1 = os.getloadavg()
    if server is not None:
        server.terminate()
        server.wait(timeout=30)

    stage_sum = sum(body.values())
    ml = sum(in_mlflow.values())
    prefect = total - stage_sum
    print(f"# orchestration overhead: {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
          f"overrides: {args.sets or 'none'}")
    print(f"pipeline wall time (kd_pipeline, as `kd run`{', running Prefect server' if server else ''}): {total:8.1f} s")
    for name, sec in sorted(body.items(), key=lambda kv: -kv[1]):
        print(f"  stage {name:<14} {sec:8.1f} s")
    print(f"  sum of stage bodies:      {stage_sum:8.1f} s")
    print(f"Prefect (total - stage bodies): {prefect:6.1f} s = {100 * prefect / total:5.2f} %")
    for name, sec in sorted(in_mlflow.items(), key=lambda kv: -kv[1]):
        print(f"  MLflow {name:<28} {sec:7.2f} s")
    print(f"MLflow calls inside stages:     {ml:6.1f} s = {100 * ml / total:5.2f} %")
    print(f"Prefect + MLflow:               {prefect + ml:6.1f} s = {100 * (prefect + ml) / total:5.2f} %  (target <= 5 %)")

    if args.dvc:
        dvc_s = dvc_bookkeeping(work)
        print(f"DVC bookkeeping:                {dvc_s:6.1f} s = {100 * dvc_s / total:5.2f} % of the pipeline")
        print(f"Prefect + MLflow + DVC:         {prefect + ml + dvc_s:6.1f} s = "
              f"{100 * (prefect + ml + dvc_s) / total:5.2f} %  (target <= 5 %)")
    if args.keep:
        print(f"scratch copy kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
