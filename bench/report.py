#!/usr/bin/env python3
"""Comparison table and chart from benchmark JSON written by `pytest bench/ --benchmark-json=...`.

    python bench/report.py                      # newest bench/results/*.json
    python bench/report.py A.json [B.json ...]  # these files
    python bench/report.py --markdown [...]     # the table as markdown (for the README)

Prints, per case: each contender's median time, fastlayers' speed-up over eager and over
torch.compile (median of per-round ratios, measured side by side), fastlayers' GB/s and GFLOP/s
(TFLOP/s on a GPU), and, where the run has one, the fraction of the same-run ceiling (copy for
memory-bound ops, torch.mm for GEMMs). Then the geometric-mean speed-ups per op, dtype and pass.
Writes a PNG next to each JSON (same name, .png): speed-up over eager per case, one bar per
contender. Exits non-zero with a message when there is nothing to report.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import textwrap
from collections import defaultdict

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# Column order; contenders not listed here follow in the order they appear.
ORDER = ["fastlayers", "fl_functional", "fl_prepacked", "eager", "eager_out", "eager_module", "compile", "compile_max",
         "onednn", "addmm_act", "mm", "linear", "copy"]
CEILINGS = {"copy": "gbps", "mm": "gflops", "linear": "gflops"}  # contender -> the rate it is a ceiling for


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"report.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def load(path: pathlib.Path):
    """(header, rows) of one JSON; rows are the extra_info dicts written by bench/harness.py."""
    if not path.is_file():
        fail(f"no such benchmark JSON: {path} (run `pytest bench/ --benchmark-json={path}` first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")
    rows = [dict(b["extra_info"], name=b.get("name", ""))
            for b in data.get("benchmarks", [])
            if {"median_ms", "median_step_ms"} & set(b.get("extra_info", {}))]  # (training steps: median_step_ms)
    if not rows:
        fail(f"{path} has no fastlayers benchmark results (was it written by bench/?)")
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw") or mi.get("processor", "?")
    backends = sorted({r.get("backend", "?") for r in rows})
    header = (f"{path.name}: {data.get('datetime', '?')[:19]}  |  {mi.get('gpu') or cpu}  |  "
              f"torch {mi.get('torch', '?')}, {mi.get('torch_threads', '?')} threads  |  "
              f"fastlayers backend: {', '.join(backends)}")
    if mi.get("fastlayers_forced_backend"):
        header += f"  (forced: {mi['fastlayers_forced_backend']}; not the default backend)"
    cores = mi.get("cpu", {}).get("count")
    load = max((r.get("load1") or 0 for r in rows if r.get("suite", "cpu") == "cpu"), default=0)
    if cores and load > cores + 1:
        header += (f"\n  WARNING: the machine was busy (1-min load average up to {load:.1f} on {cores} "
                   f"cores): other work competed for the CPU; rerun on a quiet machine before reporting.")
    if mi.get("quick"):
        header += "  [QUICK run: reduced shapes and rounds, not for reporting]"
    return header, rows


def contender_names(rows):
    seen = []
    for r in rows:
        for n in r["contenders"]:
            if n not in seen:
                seen.append(n)
    return sorted(seen, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), seen.index(n)))


def fmt(v, digits=4):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def build_table(rows):
    """(column names, list of row cells) for one suite."""
    gpu = any(r.get("suite") == "gpu" for r in rows)
    rate, scale = ("TFLOP/s", 1e-3) if gpu else ("GFLOP/s", 1.0)
    names = contender_names(rows)
    ceil = [c for c in CEILINGS if any(c in r["contenders"] for r in rows)]
    cols = (["op", "shape", "dtype", "pass"] + [f"{n} ms" for n in names]
            + ["fl/eager", "fl/compile"] + (["fl/compile_max"] if "compile_max" in names else [])
            + ["fl GB/s", f"fl {rate}"] + (["fl/ceiling"] if ceil else []))
    out = []
    for r in rows:
        sp = r.get("fastlayers_speedup", {})
        cells = [r.get("op", "?"), r.get("shape", "?"), r.get("dtype", "?"), r.get("pass", "?")]
        cells += [fmt(r["median_ms"].get(n)) for n in names]
        cells += [fmt(sp.get("eager"), 3), fmt(sp.get("compile"), 3)]
        if "compile_max" in names:
            cells.append(fmt(sp.get("compile_max"), 3))
        gf = r.get("gflops", {}).get("fastlayers")
        cells += [fmt(r.get("gbps", {}).get("fastlayers")), fmt(gf * scale if gf else None)]
        if ceil:
            cells.append(fmt(ceiling_fraction(r), 3))
        out.append(cells)
    return cols, out


def ceiling_fraction(r):
    """fastlayers' rate as a fraction of the same-run ceiling's (copy GB/s or torch.mm FLOP/s)."""
    for c, key in CEILINGS.items():
        have = r.get(key, {})
        if c in r["contenders"] and have.get(c) and have.get("fastlayers"):
            return have["fastlayers"] / have[c]
    return None


def geomean(v):
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def summary(rows):
    """Geometric-mean speed-ups of fastlayers per (op, dtype, pass) over the shapes."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r.get("op"), r.get("dtype"), r.get("pass"))
        for b, v in r.get("fastlayers_speedup", {}).items():
            if b not in CEILINGS:  # a ceiling is not a baseline; it is in fl/ceiling
                groups[key][b].append(v)
        frac = ceiling_fraction(r)
        if frac:
            groups[key]["ceiling"].append(frac)
    baselines = [n for n in contender_names(rows)[1:] if n not in CEILINGS]
    has_ceil = any("ceiling" in by for by in groups.values())
    cols = (["op", "dtype", "pass", "shapes"] + [f"fl/{b} (geomean)" for b in baselines]
            + (["fl/ceiling (geomean)"] if has_ceil else []))
    out = []
    for (op, dt, ps), by in groups.items():
        n = max((len(v) for v in by.values()), default=0)
        cells = [op, dt, ps, str(n)]
        cells += [fmt(geomean(by.get(b)), 3) for b in baselines + (["ceiling"] if has_ceil else [])]
        out.append(cells)
    return cols, out


def throughput_table(rows):
    """Whole-model rows: items per second per contender (tokens/s or images/s)."""
    rows = [r for r in rows if r.get("throughput")]
    if not rows:
        return None
    names = contender_names(rows)
    cols = ["model", "shape", "dtype", "pass", "unit"] + [f"{n}" for n in names] + ["fl/eager", "fl/compile"]
    out = []
    for r in rows:
        sp = r.get("fastlayers_speedup", {})
        out.append([r.get("op", "?"), r.get("shape", "?"), r.get("dtype", "?"), r.get("pass", "?"),
                    r.get("unit", "items/s")] + [fmt(r["throughput"].get(n)) for n in names]
                   + [fmt(sp.get("eager"), 3), fmt(sp.get("compile"), 3)])
    return cols, out


def training_table(rows):
    """Whole training steps (bench/test_bench_training.py): peak extra memory of one step in a fresh
    process, plain / swap / swap(skip_logits=True); the step time plain vs skip_logits vs
    torch.compile of the plain model; the no-grad forward (inference) plain vs swap."""
    rows = [r for r in rows if "median_step_ms" in r]
    if not rows:
        return None
    cols = ["model", "tokens", "dtype", "peak MiB plain", "swap", "skip_logits", "skip/plain memory",
            "step ms plain", "skip_logits", "compile", "plain/skip time", "compile/skip time",
            "plain/skip CPU time", "infer ms plain", "swap", "plain/swap infer"]
    out = []
    for r in rows:
        mem, ms = r["peak_extra_mib"], r.get("median_step_ms", {})
        inf = r.get("infer_ms") or {}
        comp = fmt(ms.get("compile")) if ms.get("compile") is not None else ("n/a" if "compile" in (r.get("skipped") or {}) else "-")
        out.append([r.get("model", r.get("op", "?")), r.get("shape", "?"), r.get("dtype", "?"),
                    fmt(mem.get("plain")), fmt(mem.get("swap")), fmt(mem.get("skip")),
                    fmt(r.get("skip_over_plain_memory"), 3), fmt(ms.get("plain")), fmt(ms.get("skip")), comp,
                    fmt(r.get("plain_over_skip_time"), 3), fmt(r.get("compile_over_skip_time"), 3),
                    fmt(r.get("plain_over_skip_cpu"), 3), fmt(inf.get("plain")), fmt(inf.get("swap")),
                    fmt(r.get("plain_over_swap_infer"), 3)])
    return cols, out


def training_notes(rows) -> list:
    """One line per mode that did not run (torch.compile where it fails), with its error."""
    return [f"{r.get('model', '?')} {r.get('dtype', '?')}: {m} not run ({why})"
            for r in rows if "median_step_ms" in r for m, why in (r.get("skipped") or {}).items()]


def training_chart(rows, header: str, png: pathlib.Path) -> None:
    """Three panels per training row: memory (skip_logits / plain), step speed-up of skip_logits
    over plain and over torch.compile, and the inference speed-up of swap over plain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "median_step_ms" in r]
    if not rows:
        return
    labels = [f"{r.get('model', '?')}\n{r.get('dtype', '?')}" for r in rows]
    x = range(len(rows))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(max(12, 1.8 * len(rows) + 4), 3.8))
    a.bar(x, [r.get("skip_over_plain_memory") or 0 for r in rows], color="tab:green")
    a.axhline(0.4, color="tab:red", linewidth=0.8, linestyle="--")
    a.set_title("peak extra memory of a step,\nskip_logits / plain (lower is better)", fontsize=9)
    w = 0.4
    b.bar([i - w / 2 for i in x], [r.get("plain_over_skip_time") or 0 for r in rows], w, color="tab:blue",
          label="vs plain")
    b.bar([i + w / 2 for i in x], [r.get("compile_over_skip_time") or 0 for r in rows], w, color="tab:orange",
          label="vs torch.compile (0: not run)")
    b.legend(fontsize=7)
    b.set_title("training step speed-up of skip_logits\n(higher is better)", fontsize=9)
    c.bar(x, [r.get("plain_over_swap_infer") or 0 for r in rows], color="tab:purple")
    c.set_title("inference (no-grad forward) speed-up,\nplain / swap (higher is better)", fontsize=9)
    for ax in (b, c):
        ax.axhline(1.0, color="black", linewidth=0.8)
    for ax in (a, b, c):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(header.split("\n")[0], fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def render(cols, rows, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    width = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    text = [c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, width))]
    lines = ["  ".join(text), "  ".join("-" * w for w in width)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, width))))
    return "\n".join(lines)


def chart(rows, header: str, png: pathlib.Path) -> None:
    """One panel per op; per case, one bar per contender: its speed-up over eager (1 = eager).
    Log scale, so 2x faster and 2x slower are the same distance from the eager line."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on these machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if "vs_eager" in r]
    if not rows:
        return

    def panel(r):  # the tiny-shape overhead cases share one panel
        return "per-call overhead (tiny shapes)" if r["op"].startswith("overhead") else r["op"]
    panels = list(dict.fromkeys(panel(r) for r in rows))
    # ceilings do different work (a bare GEMM, a copy): they are in the table, not the chart
    names = [n for n in contender_names(rows) if n != "eager" and n not in CEILINGS]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(dict.fromkeys(ORDER + names), palette * 3))
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
    most = max(sum(panel(r) == p for r in rows) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.9 * most + 2), 3.2 * len(panels)),
                             squeeze=False)
    for ax, title in zip(axes[:, 0], panels):
        cases = [r for r in rows if panel(r) == title]
        present = [n for n in names if any(n in r["vs_eager"] for r in cases)]
        width = 0.8 / max(len(present), 1)
        for j, n in enumerate(present):
            xs = [i + (j - (len(present) - 1) / 2) * width for i, r in enumerate(cases)
                  if n in r["vs_eager"]]
            ys = [r["vs_eager"][n] for r in cases if n in r["vs_eager"]]
            # bars grow from the eager line: up = faster than eager, down = slower
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=n, color=colors[n])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        values = [v for r in cases for v in r["vs_eager"].values()]
        lo, hi = min(0.5, min(values) / 1.2), max(2.0, max(values) * 1.2)
        ax.set_ylim(lo, hi)
        ax.set_yticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
                       if lo <= t <= hi])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([(f"{r['op'].replace('overhead_', '')} " if title != r["op"] else "")
                            + f"{r['shape']}\n{short.get(r['dtype'], r['dtype'])} {r['pass']}"
                            for r in cases], fontsize=7)
        ax.set_xlim(-0.6, max(len(cases), 4) - 0.4)  # keep bars narrow in short panels
        ax.set_ylabel("speed-up over eager")
        ax.set_title(title, fontsize=10, loc="left")
        ax.legend(fontsize=7, ncol=len(present), loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    wrap = int(fig.get_figwidth() * 15)  # ~characters per line at fontsize 8
    fig.suptitle("\n".join(textwrap.fill(line, wrap) for line in header.split("\n")), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.04 / len(panels)))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="*", type=pathlib.Path,
                   help="benchmark JSON files (default: the newest in bench/results/)")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--no-png", action="store_true", help="don't write the chart")
    args = p.parse_args(argv)

    paths = args.json
    if not paths:
        found = sorted(RESULTS.glob("*.json"), key=lambda f: f.stat().st_mtime)
        if not found:
            fail(f"no benchmark JSON in {RESULTS}; run the suite first, e.g. "
                 f"`pytest bench/ --benchmark-json={RESULTS}/cpu-latest.json`")
        paths = [found[-1]]

    for path in paths:
        header, rows = load(path)
        train = [r for r in rows if "median_step_ms" in r]
        rows = [r for r in rows if "median_ms" in r]
        # op-major order (pytest runs them pass-major): each op's fwd cases, then its fwd+bwd
        ops = list(dict.fromkeys(r.get("op") for r in rows))
        passes = list(dict.fromkeys(r.get("pass") for r in rows))
        rows.sort(key=lambda r: (ops.index(r.get("op")), passes.index(r.get("pass"))))
        print(("### " if args.markdown else "") + header + "\n")
        for suite in dict.fromkeys(r.get("suite", "cpu") for r in rows):
            srows = [r for r in rows if r.get("suite", "cpu") == suite]
            print(render(*build_table(srows), args.markdown) + "\n")
            print(render(*summary(srows), args.markdown) + "\n")
            tp = throughput_table(srows)
            if tp:
                print(render(*tp, args.markdown) + "\n")
        tt = training_table(train)
        if tt:
            print(("### " if args.markdown else "") + "Training steps (one step, fresh processes; MiB of "
                  "peak extra memory, ms per step)\n")
            print(render(*tt, args.markdown) + "\n")
            for line in training_notes(train):
                print(("- " if args.markdown else "  ") + line)
        print("speed-ups are fastlayers' (>1 = fastlayers faster): median of per-round ratios, "
              "contenders interleaved in one run.\n")
        if not args.no_png:
            png = path.with_suffix(".png")
            if rows:
                chart(rows, header, png)
                print(f"chart: {png}\n")
            if train:
                tpng = path.with_name(path.stem + "-training.png")
                training_chart(train, header, tpng)
                print(f"chart: {tpng}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
