"""How long ``storefed --help`` takes (it must stay under 1 s: the registry imports no command).

A measurement, not a timed test: ``python -m storefed.simulations.experiments.help_bench
[--repeats N] [--out FILE]`` runs ``storefed --help`` (the installed console script beside this
Python) N times in fresh processes and writes the wall seconds (each, median, max) as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(repeats: int) -> list[float]:
    """Wall seconds of ``storefed --help`` in ``repeats`` fresh processes."""
    exe = Path(sys.executable).with_name("storefed")
    cmd = [str(exe), "--help"] if exe.exists() else [
        sys.executable, "-m", "storefed.simulations.cli", "--help"]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.help_bench",
                                description="Time `storefed --help`.")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="runs/help-bench.json")
    args = p.parse_args(argv)
    times = measure(args.repeats)
    doc = {"command": "storefed --help", "repeats": args.repeats, "seconds": times,
           "median_s": statistics.median(times), "max_s": max(times), "limit_s": 1.0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"storefed --help: median {doc['median_s']:.3f}s, max {doc['max_s']:.3f}s over "
          f"{args.repeats} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
