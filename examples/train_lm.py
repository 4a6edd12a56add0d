"""Train a small GPT (nanoGPT's architecture) on real text end to end, plain PyTorch vs the same
model after ``fastlayers.swap(model, skip_logits=True)``; print the loss curves, tokens/s and the
peak memory of each, and draw both curves into a PNG.

    python examples/train_lm.py [--steps 200] [--layers 4] [--embd 128] [--png train_lm.png]

The text is Python's own documentation (the help topics `pydoc_data.topics` that every CPython
ships, ~460k characters): nothing to download. Bytes are the tokens (vocabulary 256). Each model
trains in a fresh process (so its peak memory is its own), from the same initial weights on the
same batches: the two curves should lie on top of each other. With ``skip_logits=True`` the
swapped model computes the training loss with ``fl.linear_cross_entropy`` on the head's weight and
never materialises the (tokens x vocabulary) logits; evaluation runs the model as written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastlayers as fl
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastlayers as fl


# ----------------------------------------------------------------------------- the model (nanoGPT's GPT)
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_embd: int, n_head: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:  # generation: the last position's logits only
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ----------------------------------------------------------------------------- data
def load_text() -> torch.Tensor:
    """Python's bundled documentation topics as a byte tensor."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def batches(data: torch.Tensor, steps: int, batch: int, block: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[j:j + block] for j in i])
        yield x, torch.stack([data[j + 1:j + 1 + block] for j in i])


# ----------------------------------------------------------------------------- one training run
def rss_mib() -> float:
    """Peak resident memory of this process, MiB: /proc's VmHWM where there is one (ru_maxrss also
    counts the parent's peak, carried across fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args, swapped: bool) -> dict:
    """Train one model in this process; returns its curve, speed and peak memory."""
    torch.set_num_threads(args.threads)
    data = load_text()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    torch.manual_seed(0)
    model = GPT(256, args.block, args.layers, args.embd, args.heads)
    if swapped:
        fl.swap(model, skip_logits=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    base = rss_mib()
    curve, t_train, tokens = [], 0.0, 0
    for step, (x, y) in enumerate(batches(train, args.steps, args.batch, args.block, seed=1)):
        model.train()
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        tokens += x.numel()
        curve.append(loss.item())
        if step % args.every == 0 or step == args.steps - 1:
            print(f"  {'fastlayers' if swapped else 'PyTorch':>10} step {step:4d}  loss {loss.item():.4f}",
                  flush=True)
    model.eval()
    with torch.no_grad():
        vals = [model(x, y)[1].item() for x, y in batches(val, 8, args.batch, args.block, seed=2)]
    return {"curve": curve, "val_loss": sum(vals) / len(vals), "tokens_per_s": tokens / t_train,
            "peak_extra_mib": rss_mib() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--every", type=int, default=25, help="print the loss every this many steps")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--png", default="train_lm.png", help="where to draw both loss curves ('' for none)")
    p.add_argument("--worker", choices=["plain", "swapped"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one model in this fresh process: print its results as JSON on the last line
        print(json.dumps(run(args, args.worker == "swapped")))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed big buffers leave RSS
    results = {}
    for name in ("plain", "swapped"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", name], env=env,
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        print(out.rsplit("\n", 2)[0])
        results[name] = json.loads(out.strip().splitlines()[-1])
    p_, s_ = results["plain"], results["swapped"]
    print(f"\n{args.steps} steps of {args.batch}x{args.block} bytes of Python's documentation, GPT with "
          f"{args.layers} layers, n_embd {args.embd}, vocabulary 256, {args.threads} threads")
    print(f"{'model':<12}{'final loss':>11}{'val loss':>10}{'tokens/s':>10}{'peak MiB':>10}")
    for name, r in (("PyTorch", p_), ("fastlayers", s_)):
        print(f"{name:<12}{r['curve'][-1]:>11.4f}{r['val_loss']:>10.4f}{r['tokens_per_s']:>10.0f}"
              f"{r['peak_extra_mib']:>10.1f}")
    print(f"fastlayers / PyTorch: {s_['tokens_per_s'] / p_['tokens_per_s']:.2f}x tokens/s, "
          f"{s_['peak_extra_mib'] / max(p_['peak_extra_mib'], 1e-9):.2f}x peak memory; largest loss gap "
          f"{max(abs(a - b) for a, b in zip(p_['curve'], s_['curve'])):.2e} (uniform: {math.log(256):.3f})")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(p_["curve"], label=f"PyTorch ({p_['tokens_per_s']:.0f} tokens/s)")
        ax.plot(s_["curve"], "--", label=f"fastlayers.swap(skip_logits=True) ({s_['tokens_per_s']:.0f} tokens/s)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats per byte)")
        ax.set_title("GPT on Python's documentation: same weights, same batches")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
