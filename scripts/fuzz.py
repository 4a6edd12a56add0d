"""`make fuzz`: the property-based differential tests (tests/ops/test_fuzz.py) with many examples and
fresh random seeds, again and again for --minutes. Each run's seed is printed; a failing run's
whole output (with hypothesis' @reproduce_failure blob and the falsifying example) is saved as
fuzz-failures/seed-<seed>.log, and hypothesis keeps the shrunk example in .hypothesis/ so the next
`pytest tests/ops/test_fuzz.py` replays it first. At the end: cases run per op x backend.
Exit status 1 when any run failed."""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--out", default=str(ROOT / "fuzz-failures"))
    ap.add_argument("--examples", type=int, default=2000,
                    help="hypothesis examples per test per run (a run of 2000 takes hours on 2 cores)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(exist_ok=True)
    counts_file = pathlib.Path(tempfile.mkstemp(prefix="fastlayers-fuzz-", suffix=".txt")[1])
    env = dict(os.environ, HYPOTHESIS_PROFILE="fuzz", FASTLAYERS_FUZZ_COUNTS=str(counts_file),
               FASTLAYERS_FUZZ_EXAMPLES=str(args.examples))
    deadline = time.monotonic() + 60 * args.minutes
    runs, failed, cut = 0, [], 0
    while time.monotonic() < deadline:
        seed = random.SystemRandom().randrange(2 ** 32)
        print(f"fuzz run {runs + 1}: --hypothesis-seed={seed}", flush=True)
        try:  # a run still going at the deadline is stopped there (its cases are counted)
            r = subprocess.run([sys.executable, "-m", "pytest", "tests/ops/test_fuzz.py", "-q", "-p", "no:cacheprovider",
                                f"--hypothesis-seed={seed}"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            runs, cut = runs + 1, cut + 1
            print("  stopped at the deadline", flush=True)
            break
        runs += 1
        tail = (r.stdout.strip().splitlines() or [""])[-1]
        print(f"  {tail}", flush=True)
        if r.returncode != 0:
            log = out / f"seed-{seed}.log"
            log.write_text(r.stdout + r.stderr)
            failed.append(str(log))
            print(f"  FAILED: output saved to {log}", flush=True)
    counts = collections.Counter(counts_file.read_text().split("\n")) if counts_file.exists() else {}
    counts.pop("", None)
    counts_file.unlink(missing_ok=True)
    print(f"\nfastlayers fuzz: {runs} run(s) in {args.minutes:g} min ({cut} stopped at the deadline), "
          f"{len(failed)} failed")
    for key, n in sorted(counts.items()):
        print(f"  {n:8d} cases  {key}")
    for log in failed:
        print(f"  reproducer: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
