"""The small nanoGPT-style model of the swap-loss and skip_logits tests: examples/train_lm.py's GPT
(tied lm_head / wte, forward(idx, targets=None) -> (logits, loss), F.cross_entropy on the head's
logits) at test sizes, and a short training run of any such model (train_losses);
tests/nanogpt_model.py is nanoGPT's own spelling of the same forward."""
import torch

import train_lm  # examples/ is on pytest's pythonpath (pyproject.toml)

H, V = 16, 37


class GPT(train_lm.GPT):
    def __init__(self, vocab=V, block=16, n_layer=2, n_embd=H, n_head=2):
        super().__init__(vocab, block, n_layer, n_embd, n_head)


def train_losses(model, vocab, steps):
    """The training losses of `steps` AdamW steps (lr 1e-2) on random tokens, next-token targets
    (the last position ignored: -1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, vocab, (4, 12), generator=g)
        targets = torch.roll(idx, -1, dims=1)
        targets[:, -1] = -1
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)
