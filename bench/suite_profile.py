"""Where the test suite's CPU time goes (issue 14): run a command (default: `make test`'s pytest) while sampling
/proc, then attribute the CPU time of every process that started during the run to a kind of process and, for
the processes the tests start, to the test that started it.

    .venv/bin/python bench/suite_profile.py [--every 0.5] [--out profile.json] [-- pytest args ...]

Linux only (/proc). Every `--every` seconds each live process's user + system time is read; a process's figure is
the last value read before it ended, so a process that lives less than one interval is missed. The command's own
CPU time (`os.wait4`: itself and the descendants it reaped) is printed beside the sampled total; a process left to
init (the stage worker, a server killed by a fixture) is sampled but not in wait4's figure. A process belongs to the test named in its
environment's PYTEST_CURRENT_TEST (pytest sets it in the worker, and the processes a test starts inherit it); a
server started by a module fixture is charged to the first test of its module ("(setup)").

Prints the wall time, the load average before and after (a shared machine), the CPU by kind of process and the
tests whose processes took the most CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTEST = [str(REPO / ".venv/bin/pytest"), "-n", "auto", "--maxprocesses", "4", "--dist", "worksteal",
          "-p", "no:cacheprovider"]
# (kind, a piece of its command line), first match wins
KINDS = [("pytest worker (tests in process)", "exec(eval(sys.stdin"), ("pytest", "bin/pytest"),
         ("Prefect server (kd run's, the harness's)", "uvicorn"), ("Prefect server", "prefect server start"),
         ("MLflow server", "mlflow server"), ("MLflow server", "gunicorn"), ("MLflow server", "huey"),
         ("kd serve: a flow run", "multiprocessing.spawn"), ("kd run", "/kd run"), ("kd serve", "/kd serve"),
         ("kd stage", "/kd stage"), ("kd (other)", "/kd "), ("launcher", "torchrun"), ("launcher", "deepspeed"),
         ("launcher", "torch.distributed"), ("dvc", "/dvc "), ("git", "git ")]


def kind(cmdline: str) -> str:
    return next((k for k, piece in KINDS if piece in cmdline), "other")


def _read(pid: str, ticks: int) -> tuple[str, float, str, str] | None:
    """(start time key, CPU seconds, command line, the test) of a live process, None if it is gone."""
    try:
        fields = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
        cmdline = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        environ = (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    test = next((e.split(b"=", 1)[1].decode(errors="replace") for e in environ
                 if e.startswith(b"PYTEST_CURRENT_TEST=")), "")
    return fields[19], (int(fields[11]) + int(fields[12])) / ticks, cmdline.strip(), test


def sample(stop: threading.Event, every: float, seen: dict) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    own = str(os.getpid())
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid != own and (read := _read(pid, ticks)) is not None:
                start, cpu, cmdline, test = read
                entry = seen.setdefault(f"{pid}:{start}", {"cmd": cmdline, "test": test, "start": int(start)})
                entry["cpu"] = cpu
        stop.wait(every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("command", nargs="*", help="after --: pytest arguments (default: the whole suite)")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("suite_profile: Linux only (/proc)")
    boot_ticks = time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")
    seen: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, args.every, seen), daemon=True)
    load_before = os.getloadavg()
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.Popen(PYTEST + args.command, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    started = {k: v for k, v in seen.items() if v["start"] >= boot_ticks - 1}  # not the machine's own daemons
    by_kind, count, by_test = Counter(), Counter(), Counter()
    for entry in started.values():
        k = kind(entry["cmd"])
        by_kind[k] += entry["cpu"]
        count[k] += 1
        if not k.startswith("pytest"):
            by_test[entry["test"] or "(no test)"] += entry["cpu"]
    print(f"\nexit status {os.waitstatus_to_exitcode(status)}; wall {wall:.0f} s; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; CPU of the command and its children (wait4) "
          f"{usage.ru_utime + usage.ru_stime:.0f} s, sampled {sum(by_kind.values()):.0f} s")
    print("\nCPU s  processes  kind")
    for k, cpu in by_kind.most_common():
        print(f"{cpu:6.0f}  {count[k]:9d}  {k}")
    print("\nCPU s of the processes a test started (top 20)")
    for test, cpu in by_test.most_common(20):
        print(f"{cpu:6.0f}  {test}")
    if args.out:
        args.out.write_text(json.dumps({"wall_s": wall, "by_kind": by_kind, "by_test": by_test}, indent=1))


if __name__ == "__main__":
    main()
