"""Where the test suite's CPU goes, per test and per module, measured beside a real run.

Every second it reads every process's user + system CPU time from /proc and charges it to the
test named in the process's environment (`PYTEST_CURRENT_TEST`, which pytest sets while a
test runs and every command the test starts inherits, with Ray's and MLflow's processes
below it). Processes without one are charged to `-<name>` (the pytest workers themselves,
whose environment was read before their first test, pip, the linters); `?` is what ended
before it could be read. A process that lives under a second is missed, and so is the last
second of each; a module fixture's processes are charged to the test that started them.

    python benchmarks/suite_cpu.py --out /tmp/suite-cpu.json -- bash .ci/run
    python benchmarks/suite_cpu.py --report /tmp/suite-cpu.json

The first runs the command with the sampler beside it and also prints the machine's busy
CPU-seconds over the run (from /proc/stat); the second prints the modules, most CPU first.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def _owner(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"PYTEST_CURRENT_TEST="):
                    return entry.split(b"=", 1)[1].decode().rsplit(" (", 1)[0]
        with open(f"/proc/{pid}/comm") as f:
            return "-" + f.read().strip()
    except OSError:
        return "?"


def _busy() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / TICK


def sample(stop: threading.Event, period_s: float = 1.0) -> dict[str, float]:
    """CPU-seconds per owner until `stop` is set; what a process had used before the first
    sample is not counted."""
    owner: dict[tuple[str, str], str] = {}
    base: dict[tuple[str, str], float] = {}
    used: dict[tuple[str, str], float] = {}
    first = True
    while not stop.is_set():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()
            key = (pid, rest[19])    # pid and start time: a reused pid is another process
            cpu = (int(rest[11]) + int(rest[12])) / TICK
            if key not in owner:
                owner[key], base[key] = _owner(pid), cpu if first else 0.0
            used[key] = cpu - base[key]
        first = False
        stop.wait(period_s)
    totals: collections.Counter = collections.Counter()
    for key, cpu in used.items():
        totals[owner[key]] += cpu
    return dict(totals)


def report(per_test: dict[str, float], top: int = 30) -> None:
    modules: collections.Counter = collections.Counter()
    for test, cpu in per_test.items():
        modules[test.split("::")[0]] += cpu
    print(f"{sum(per_test.values()):8.0f}  CPU-seconds charged in all")
    for module, cpu in modules.most_common(top):
        print(f"{cpu:8.0f}  {module}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where to write the per-test CPU-seconds (JSON)")
    parser.add_argument("--report", help="print the modules of a JSON written by --out")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not args.out:
        parser.error("give --out FILE -- COMMAND, or --report FILE")
    stop, result = threading.Event(), {}
    sampler = threading.Thread(target=lambda: result.update(sample(stop)), daemon=True)
    busy, started = _busy(), time.time()
    sampler.start()
    code = subprocess.call(command)
    stop.set()
    sampler.join()
    wall, busy = time.time() - started, _busy() - busy
    with open(args.out, "w") as f:
        json.dump(result, f, indent=0, sort_keys=True)
    print(f"{wall:.0f} s, the machine busy {busy:.0f} CPU-seconds "
          f"({busy / wall / os.cpu_count():.0%} of {os.cpu_count()} cores); exit {code}")
    report(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
