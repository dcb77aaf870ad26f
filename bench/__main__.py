"""``python -m bench [NAME ...] [--smoke] [--list]``: run benchmarks by name."""

from __future__ import annotations

import argparse
import sys

import bench
from bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    available = BENCHMARKS
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few iterations: check it still runs"
    )
    parser.add_argument("--list", action="store_true", help="list benchmarks")
    args = parser.parse_args(argv)

    if args.list:
        for name, benchmark in available.items():
            print(f"{name:12} {benchmark.description}")
        return 0
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}; "
            f"choose from {', '.join(available)}"
        )

    bench.setup_django()
    met = True
    for name in args.names or list(available):
        print(f"== {name}{' (smoke)' if args.smoke else ''} ==")
        met = available[name].run(smoke=args.smoke) and met
    # A missed target is a finding to report, not a crash; smoke runs only
    # prove the benchmark works.
    return 0 if met or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
