"""Wall time of `prefalign <command> --help` for every command, each in a fresh interpreter (what a user waits for).

Help must not import the training stack (torch, transformers): the registry names each command's config class and
only `prefalign.config` is imported to build the parser. Goal: under 1.5 s per command on the project's 2-core CPU.

    python benchmarks/cli_help_bench.py               # 5 runs per command, the median reported
    python benchmarks/cli_help_bench.py --runs 3 --json results.json

Also reports which heavy modules a `--help` run imported (none is the expected answer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 1.5
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")
# Run the CLI in-interpreter and report the heavy modules it pulled in, after printing the help.
PROBE = ("import sys\nfrom prefalign.cli import main\nrc = main(sys.argv[1:])\n"
         f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\nsys.exit(rc)")


def commands() -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from prefalign.commands import COMMANDS

    return list(COMMANDS)


def time_help(command: str, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    times, heavy = [], ""
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, *command.split(), "--help"], env=env,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0 or "--" not in proc.stdout:
            raise SystemExit(f"prefalign {command} --help failed (rc {proc.returncode}): {proc.stderr.strip()}")
        heavy = proc.stderr.strip().rpartition("HEAVY=")[2]
    return {"command": command, "median_s": statistics.median(times), "max_s": max(times), "heavy_imports": heavy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    baseline = time_help_python(args.runs)
    rows = [time_help(c, args.runs) for c in commands()]
    print(f"python -c pass (interpreter start): {baseline:.3f} s median")
    print(f"{'command':<18} {'median s':>9} {'max s':>7}  heavy imports   goal < {GOAL_S} s")
    for r in rows:
        ok = "ok" if r["max_s"] < GOAL_S else "SLOW"
        print(f"{r['command']:<18} {r['median_s']:>9.3f} {r['max_s']:>7.3f}  {r['heavy_imports'] or 'none':<15} {ok}")
    if args.json:
        Path(args.json).write_text(json.dumps({"interpreter_s": baseline, "commands": rows}, indent=2) + "\n")


def time_help_python(runs: int) -> float:
    """The floor: starting the interpreter itself."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
