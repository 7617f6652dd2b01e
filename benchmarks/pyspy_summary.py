"""Summarise py-spy raw (collapsed) stacks, as ``gpu_device.sh PROFILE=...`` records them:
share of samples per thread and, for the threads matching ``--threads``, the share of samples
each function is on the stack for (inclusive) and at the top of it (self).

    python benchmarks/pyspy_summary.py profile_actor.txt --threads Dummy --top 30 --out results/x.md
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    rows = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            rows.append((stack.split(";"), int(n)))
    return rows


def frame(f: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func file.py:123``."""
    name, _, where = f.partition(" (")
    return f"{name} {where.rstrip(')').rsplit('/', 1)[-1]}" if where else f


def summary(rows: list[tuple[list[str], int]], threads: str, top: int) -> str:
    total = sum(n for _, n in rows)
    per_thread = collections.Counter()
    for s, n in rows:
        per_thread[s[0].split(": ", 1)[-1]] += n
    mine = [(s, n) for s, n in rows if threads in s[0]]
    n_mine = sum(n for _, n in mine) or 1
    inclusive, own = collections.Counter(), collections.Counter()
    for s, n in mine:
        for f in {frame(f) for f in s[1:]}:
            inclusive[f] += n
        own[frame(s[-1])] += n
    out = [f"{total} samples; by thread: " + ", ".join(f"{k} {v / total:.0%}" for k, v in per_thread.most_common(6)),
           "", f"Threads matching {threads!r}: {n_mine} samples", "",
           "| on the stack | at the top | function |", "|---:|---:|---|"]
    for f, v in inclusive.most_common(top):
        out.append(f"| {v / n_mine:.1%} | {own.get(f, 0) / n_mine:.1%} | `{f}` |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path)
    p.add_argument("--threads", default="", help="substring of the thread names to break down")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    text = summary(load(args.raw), args.threads, args.top)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
