"""Summarise a py-spy speedscope profile: per thread, the heaviest frames (inclusive and
self), optionally under a frame whose name matches --under.

    python bench/spy_summary.py PROFILE.json [--top 25] [--under assign_job]
"""

from __future__ import annotations

import argparse
import collections
import json
from typing import Any


def summarise(path: str, top: int = 25, under: str = "", min_share: float = 0.02) -> str:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    frames = data["shared"]["frames"]
    names = [
        f"{f['name']} ({f.get('file', '').rsplit('/', 2)[-1]}:{f.get('line', '')})" for f in frames
    ]
    lines = []
    grand = sum(sum(p.get("weights", [])) or len(p["samples"]) for p in data["profiles"])
    for prof in data["profiles"]:
        samples, weights = prof["samples"], prof.get("weights") or [1] * len(prof["samples"])
        total = sum(weights)
        if not total or total < grand * min_share:
            continue
        incl: collections.Counter[int] = collections.Counter()
        self_: collections.Counter[int] = collections.Counter()
        scoped = 0
        for stack, w in zip(samples, weights, strict=True):
            if under:
                idx = next((i for i, f in enumerate(stack) if under in names[f]), None)
                if idx is None:
                    continue
                stack = stack[idx:]
            scoped += w
            for f in set(stack):
                incl[f] += w
            if stack:
                self_[stack[-1]] += w
        base = scoped if under else total
        if not base:
            continue
        lines.append(
            f"== {prof.get('name', '?')}: {total} samples"
            + (f", {scoped} under {under!r}" if under else "")
        )
        lines.append("  inclusive:")
        for f, w in incl.most_common(top):
            lines.append(f"    {100 * w / base:5.1f}%  {names[f]}")
        lines.append("  self:")
        for f, w in self_.most_common(top // 2):
            lines.append(f"    {100 * w / base:5.1f}%  {names[f]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--under", default="")
    args = parser.parse_args()
    print(summarise(args.path, args.top, args.under))


if __name__ == "__main__":
    main()
