"""Two or more checkouts of the service side by side: ``python -m bench.compare``.

    python -m bench.compare read base=. patched=/tmp/lockngen-patched
    python -m bench.compare write base=. patched=/tmp/lockngen-patched

Not a benchmark of its own: the tool behind the before/after tables in
docs/PERFORMANCE.md, the read or write driver of ``bench.paths`` run on every
checkout. One scratch database; one gunicorn per checkout (each with its own
code, the same ``gunicorn.conf.py`` settings); the bare view of the first
checkout as the baseline; wrk alternating bare, A, B, … at each concurrency
level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bench
from bench import paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("path", choices=list(paths.PATHS))
    parser.add_argument("checkouts", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=1)
    args = parser.parse_args(argv)
    checkouts = {
        name: Path(directory)
        for name, directory in (item.split("=", 1) for item in args.checkouts)
    }

    bench.setup_django()
    paths.compare(
        paths.PATHS[args.path],
        checkouts,
        levels=tuple(int(level) for level in args.levels.split(",")),
        rounds=args.rounds,
        duration=args.duration,
    )


if __name__ == "__main__":
    main()
