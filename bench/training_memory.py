"""One training step of a small language model: peak extra memory and step time, plain vs
fl.swap(model, skip_logits=True) (the loss by fastlayers.linear_cross_entropy, no logits).

Models (random weights), at BATCH x SEQ = 4 x 256 tokens:
  llama    Hugging Face LlamaForCausalLM: vocab 32000, hidden 256, 4 layers, 4 heads, MLP 688
  gpt2     Hugging Face GPT2LMHeadModel: vocab 50257, n_embd 256, 4 layers, 4 heads (dropout off)
  nanogpt  Karpathy's nanoGPT GPT (tests/nanogpt_model.py): vocab 50304, n_embd 256, 4 layers, 4 heads
  nanogpt_char  the same GPT at a character vocabulary: vocab 65, n_embd 64, 4 layers, 4 heads (its
           "small nanoGPT": every layer below the fused paths' thresholds, so swapped it runs
           PyTorch's ops behind fastlayers' wrappers -- what the wrappers cost shows here)
  bert     Hugging Face BertForMaskedLM: vocab 30522, hidden 256, 4 layers, 4 heads, MLP 1024, MLM labels
           (15% of the positions, the rest -100). Its head (transform + decoder) computes the loss
           inline, not through lm_head + loss_function: skip_logits leaves it alone, so its "skip"
           column is fl.swap's fused layers and loss on materialised logits.
Modes: plain (the model as built), swap (fl.swap(model)), skip (fl.swap(model, skip_logits=True)),
compile (torch.compile(plain model), default mode: time only; its first steps compile, untimed).

Memory (`memory` command, one model / dtype / mode per fresh process, as NOTES.md says): the
parameters' gradients are preallocated (zeros) and the optimizer is SGD without momentum (no
state), so the step allocates only what forward, loss and backward hold; peak extra memory =
ru_maxrss after one step (forward, loss, backward, optimizer step) - ru_maxrss before it. Run with
MALLOC_MMAP_THRESHOLD_=131072 so freed large buffers leave the RSS (main() re-executes itself with
it when unset).

Time (`time` command, one process, glibc's default malloc settings): the modes' steps in
interleaved rounds (each round runs every mode once, the first rotating; at least --rounds, and
more until they took --min-seconds), after 2 warm-up steps each; the median step time per mode and the median of the per-round ratios plain / mode.

    python bench/training_memory.py              # the whole table (fresh processes), printed and as JSON
    python bench/training_memory.py memory llama float32 skip
    python bench/training_memory.py time llama float32 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BATCH, SEQ = 4, 256
MODELS = ("llama", "gpt2", "nanogpt", "nanogpt_char", "bert")
DTYPES = ("float32", "bfloat16")
MODES = ("plain", "swap", "skip")
TIME_MODES = ("plain", "skip", "compile")
MAX_ROUNDS = 201
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def build(name: str, dtype: str, mode: str):
    """(model in training mode, step function)."""
    import torch
    import fastlayers as fl
    torch.manual_seed(0)
    if name.startswith("nanogpt"):
        import nanogpt_model
        vocab, n_embd = (65, 64) if name == "nanogpt_char" else (50304, 256)
        model = nanogpt_model.GPT(nanogpt_model.GPTConfig(block_size=SEQ, vocab_size=vocab, n_layer=4, n_head=4,
                                                          n_embd=n_embd, dropout=0.0, bias=True))
    else:
        import transformers
        transformers.logging.set_verbosity_error()
        if name == "llama":
            cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                           max_position_embeddings=SEQ)
            model = transformers.LlamaForCausalLM(cfg)
        elif name == "bert":
            cfg = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=1024, max_position_embeddings=SEQ,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = transformers.BertForMaskedLM(cfg)
        else:
            cfg = transformers.GPT2Config(vocab_size=50257, n_embd=256, n_layer=4, n_head=4, n_positions=SEQ,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(cfg)
        vocab = cfg.vocab_size
    model = model.to(getattr(torch, dtype)).train()
    if mode in ("swap", "skip"):
        fl.swap(model, skip_logits=(mode == "skip"))
    fwd = torch.compile(model) if mode == "compile" else model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=1e-4)

    if name.startswith("nanogpt"):
        targets = torch.roll(ids, -1, dims=1)
        targets[:, -1] = -1

        def step():
            _, loss = fwd(ids, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss
    else:
        labels = ids
        if name == "bert":  # masked-LM labels: 15% of the positions, the others ignored
            labels = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.15, ids, -100)

        def step():
            loss = fwd(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss
    return model, step


def build_inference(name: str, dtype: str, mode: str):
    """A no-grad forward (eval mode, no labels) of the model as `build` makes it: plain or swap."""
    import torch
    model, _ = build(name, dtype, "swap" if mode == "swap" else "plain")
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)

    def forward():
        with torch.no_grad():
            return model(ids) if name.startswith("nanogpt") else model(input_ids=ids)
    return forward


def _rss_mib() -> float:
    """This process's peak resident memory, MiB: /proc's VmHWM (its own address space's high-water
    mark) where there is one. Not ru_maxrss alone: Linux carries the parent's peak into a child
    across fork + exec, so a fresh interpreter started from a big process (pytest after the other
    benchmarks) reads the parent's peak before and after the step (measured: 0 MiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _reset_peak() -> None:
    """Start the high-water mark from the current resident size (Linux: clear_refs 5), so the
    step's peak is not hidden by a larger one while the model was built."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory(name: str, dtype: str, mode: str) -> dict:
    import gc
    model, step = build(name, dtype, mode)
    gc.collect()
    _reset_peak()
    before = _rss_mib()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    after = _rss_mib()
    return {"model": name, "dtype": dtype, "mode": mode, "peak_extra_mib": after - before,
            "rss_before_mib": before, "first_step_s": first, "loss": float(loss.detach())}


def timing(name: str, dtype: str, rounds: int, modes=("plain", "skip"), inference: bool = False,
           min_seconds: float = 0.0) -> dict:
    """Interleaved rounds of whole training steps (or, inference=True, no-grad forwards) per mode:
    at least `rounds`, and more (up to MAX_ROUNDS) until the rounds took `min_seconds`. A small
    model's step (nanoGPT at a character vocabulary: 25 ms) needs many rounds: its per-round ratio
    varies by +-3 % on this shared machine, so a median of 5 moved from 0.95 to 1.01 between runs
    of the same code, while 61 interleaved rounds of plain vs plain read 0.998 (2026-12-07).
    A mode that fails to build or to run its warm-up (torch.compile where the compiler cannot
    handle the model) is dropped, its error kept in "skipped"."""
    import gc
    import torch
    steps, skipped = {}, {}
    for m in modes:
        try:
            s = build_inference(name, dtype, m) if inference else build(name, dtype, m)[1]
            for _ in range(3 if m == "compile" else 2):
                s()
            steps[m] = s
        except Exception as e:  # noqa: BLE001  (reported, not hidden: the table says why)
            if m == "plain":
                raise
            skipped[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    modes = tuple(steps)
    times = {m: [] for m in modes}
    cpu = {m: [] for m in modes}  # process CPU time (all threads): less disturbed by other work on the cores
    gc.collect()
    r, start = 0, time.perf_counter()
    while r < rounds or (time.perf_counter() - start < min_seconds and r < MAX_ROUNDS):
        k = r % len(modes)
        r += 1
        for m in modes[k:] + modes[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    out = {"model": name, "dtype": dtype, "rounds": r, "threads": torch.get_num_threads(),
           "median_ms": {m: statistics.median(t) * 1e3 for m, t in times.items()},
           "plain_over": {m: statistics.median(a / b for a, b in zip(times["plain"], t))
                          for m, t in times.items() if m != "plain"},
           "median_cpu_ms": {m: statistics.median(t) * 1e3 for m, t in cpu.items()},
           "plain_over_cpu": {m: statistics.median(a / b for a, b in zip(cpu["plain"], t))
                              for m, t in cpu.items() if m != "plain"}}
    out["load1"] = os.getloadavg()[0]
    out["skipped"] = skipped
    return out


def run_fresh(*args: str, timeout: float = 900) -> dict:
    """One configuration in a fresh interpreter; its JSON result. The memory command runs with the
    mmap threshold set (freed buffers leave the RSS); time and inference with glibc's defaults, what
    users run: a fixed 128 KiB threshold makes every buffer above it fresh pages, faulted in again
    each step, and moved nanoGPT bf16's plain / skip_logits step time from 1.25 to 1.06
    (linear_cross_entropy's 16 MB gradient blocks are recycled heap memory under the default)."""
    env = {**os.environ, **MMAP_ENV} if args[0] == "memory" else {
        k: v for k, v in os.environ.items() if k not in MMAP_ENV}
    res = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(models=MODELS, dtypes=DTYPES, modes=MODES, rounds: int = 5, time_modes=TIME_MODES,
          inference: bool = True, min_seconds: float = 4.0) -> list:
    """The whole-model rows; timings take at least `rounds` rounds and at least `min_seconds` of
    rounds (see timing)."""
    rows = []
    more = ("--min-seconds", str(min_seconds))
    for name in models:
        for dtype in dtypes:
            mem = {m: run_fresh("memory", name, dtype, m) for m in modes}
            # plain vs skip, and plain vs compile, each in its own process: a compiled model in the
            # process measured slowing the eager steps beside it (gpt2 fp32: plain / skip 1.16 alone,
            # 1.01 with a compiled model in the same rounds; busy machine)
            tim = run_fresh("time", name, dtype, "--rounds", str(rounds), *more, "--modes",
                            ",".join(m for m in time_modes if m != "compile"))
            if "compile" in time_modes:
                timc = run_fresh("time", name, dtype, "--rounds", str(rounds), *more, "--modes", "plain,compile")
                tim["median_ms"]["compile"] = timc["median_ms"]["compile"] if "compile" in timc["median_ms"] else None
                if "compile" in timc["plain_over"]:
                    tim["plain_over"]["compile"] = timc["plain_over"]["compile"]
                tim["skipped"] = {**tim.get("skipped", {}), **timc.get("skipped", {})}
                tim["load1"] = max(tim["load1"], timc["load1"])
            inf = run_fresh("infer", name, dtype, "--rounds", str(rounds), *more) if inference else None
            rows.append({"model": name, "dtype": dtype,
                         "peak_extra_mib": {m: mem[m]["peak_extra_mib"] for m in modes},
                         "loss": {m: mem[m]["loss"] for m in modes},
                         "skip_over_plain_memory": mem["skip"]["peak_extra_mib"] / mem["plain"]["peak_extra_mib"],
                         "median_step_ms": tim["median_ms"], "plain_over_skip_time": tim["plain_over"]["skip"],
                         "median_step_cpu_ms": tim.get("median_cpu_ms"),
                         "plain_over_skip_cpu": tim.get("plain_over_cpu", {}).get("skip"),
                         "compile_over_skip_time": _ratio(tim, "compile", "skip"),
                         "plain_over_compile_time": tim["plain_over"].get("compile"),
                         "skipped": tim.get("skipped", {}),
                         "infer_ms": inf and inf["median_ms"],
                         "plain_over_swap_infer": inf and inf["plain_over"].get("swap"),
                         "load1": max(tim["load1"], inf["load1"] if inf else 0)})
            print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _ratio(tim: dict, a: str, b: str):
    """Step time of mode a / mode b: their medians of per-round ratios against plain (each mode's
    own interleaved plain), divided; None when either did not run."""
    po = tim["plain_over"]
    return po[b] / po[a] if a in po and b in po else None


def _row(r: dict) -> str:
    pk, ms = r["peak_extra_mib"], r["median_step_ms"]
    return (f"{r['model']:8s} {r['dtype']:9s} peak extra MiB plain {pk['plain']:7.1f} swap {pk.get('swap', float('nan')):7.1f} "
            f"skip {pk['skip']:7.1f}  skip/plain {r['skip_over_plain_memory']:.2f}   step ms plain {ms['plain']:7.1f} "
            f"skip {ms['skip']:7.1f}\n{'':19s}plain/skip {r['plain_over_skip_time']:.2f}  cpu plain/skip "
            f"{r.get('plain_over_skip_cpu') or float('nan'):.2f}  compile/skip {r.get('compile_over_skip_time') or float('nan'):.2f}"
            f"  inference plain/swap {r.get('plain_over_swap_infer') or float('nan'):.2f}  (load {r['load1']:.1f})"
            + (f"\n{'':19s}not run: {r['skipped']}" if r.get("skipped") else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", nargs="?", default="table", choices=("table", "memory", "time", "infer"))
    ap.add_argument("model", nargs="?", choices=MODELS)
    ap.add_argument("dtype", nargs="?", choices=DTYPES)
    ap.add_argument("mode", nargs="?", choices=MODES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=None,
                    help="more rounds (up to %d) until they took this long (time / infer: 0, table: 4)" % MAX_ROUNDS)
    ap.add_argument("--modes", default="plain,skip", help="time: the modes, comma-separated")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for the time command")
    ap.add_argument("--json", help="write the table's rows here")
    a = ap.parse_args()
    if a.command == "memory":
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_ENV["MALLOC_MMAP_THRESHOLD_"]:
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MMAP_ENV})
        print(json.dumps(memory(a.model, a.dtype, a.mode)))
    elif a.command == "time":
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        print(json.dumps(timing(a.model, a.dtype, a.rounds, tuple(a.modes.split(",")), min_seconds=a.min_seconds or 0.0)))
    elif a.command == "infer":
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        print(json.dumps(timing(a.model, a.dtype, a.rounds, ("plain", "swap"), inference=True,
                                min_seconds=a.min_seconds or 0.0)))
    else:
        rows = table(models=(a.model,) if a.model else MODELS, dtypes=(a.dtype,) if a.dtype else DTYPES,
                     rounds=a.rounds, min_seconds=4.0 if a.min_seconds is None else a.min_seconds)
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
