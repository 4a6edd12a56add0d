"""CPU benchmarks: one training step of a small LM, plain vs fl.swap(model, skip_logits=True) vs
torch.compile of the plain model; and the no-grad forward (inference), plain vs fl.swap(model).

HF LlamaForCausalLM (vocab 32000), HF GPT2LMHeadModel (vocab 50257), nanoGPT's GPT (vocab 50304)
and HF BertForMaskedLM (vocab 30522, MLM labels), hidden 256, 4 layers, 4 x 256 tokens, float32
and bfloat16 (bench/training_memory.py builds them). Each memory figure comes from a fresh
process (MALLOC_MMAP_THRESHOLD_=131072, gradients preallocated, SGD without state): the peak
resident memory of one step above the resident memory before it. Step times come from one process
running the modes in interleaved rounds, at least 5 and at least 4 s of them (a small model's
step needs dozens of rounds for a steady median; compile's first steps, which compile, untimed);
inference latencies likewise from another.

extra_info: peak_extra_mib (plain / swap / skip), skip_over_plain_memory, median_step_ms (plain /
skip / compile), plain_over_skip_time (median of per-round ratios), plain_over_compile_time,
compile_over_skip_time, infer_ms (plain / swap), plain_over_swap_infer, skipped (a mode that did
not run, and why), and the losses of the three memory modes (the same model and batch: they agree
to rounding). The benchmark's own time is the whole measurement (several fresh interpreters), not
a step. Quick runs (CI): Llama fp32 only, 3 rounds, no torch.compile column (compiling a model's
training step takes minutes on a 2-core machine).
"""
import pytest

from harness import QUICK
import training_memory as tm

CASES = [(m, d) for m in tm.MODELS for d in tm.DTYPES]
if QUICK:
    CASES = [("llama", "float32")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_training_step(benchmark, cpu_backend, name, dtype):
    rows = []
    time_modes = ("plain", "skip") if QUICK else tm.TIME_MODES
    benchmark.pedantic(lambda: rows.append(tm.table(models=(name,), dtypes=(dtype,), rounds=3 if QUICK else 5,
                                                    min_seconds=0.0 if QUICK else 4.0,
                                                    time_modes=time_modes)[0]),
                       rounds=1, iterations=1, warmup_rounds=0)
    row = rows[0]
    benchmark.group = "training step"
    benchmark.extra_info.update({"suite": "cpu", "op": f"train_{name}", "shape": f"{tm.BATCH}x{tm.SEQ}",
                                 "dtype": dtype, "pass": "train", "backend": cpu_backend, **row})
    losses = list(row["loss"].values())
    assert max(losses) - min(losses) <= 1e-2 * abs(losses[0]), row["loss"]
