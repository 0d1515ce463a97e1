"""Whether two runs logged the same numbers: their ``metrics.jsonl`` compared line by line, exactly.

    python bench/compare_metrics.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl

Every logged value but ``train/step_time`` must be equal to the bit; prints how many were compared
and the first that differ, and exits 1 if any does. Used to check that a refactor moves no number:
run the same command (``train.log_every=1``, ``train.stop_at=200``) on the commit before and after,
with ``OMP_NUM_THREADS=1`` (two CPU threads reduce in a varying order: the same commit run twice
differs in the last bits from the first few steps).
"""

from __future__ import annotations

import json
import sys

SKIPPED = ("train/step_time",)


def main(argv: list[str]) -> int:
    a, b = ([json.loads(line) for line in open(path)] for path in argv[:2])
    if len(a) != len(b):
        sys.stdout.write(f"{len(a)} lines against {len(b)}\n")
        return 1
    compared, differ = 0, []
    for row_a, row_b in zip(a, b, strict=True):
        for key in row_a:
            if key in SKIPPED:
                continue
            compared += 1
            if row_a[key] != row_b.get(key):
                differ.append(f"step {row_a.get('step')}: {key} {row_a[key]!r} != {row_b.get(key)!r}")
    sys.stdout.write("".join(line + "\n" for line in differ[:5]))
    sys.stdout.write(f"{len(a)} lines, {compared} values compared, {len(differ)} differ\n")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
