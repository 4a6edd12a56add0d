"""A small MLP classifier trained on real data (scikit-learn's digits): built from FusedLinear +
LogSoftmax it follows the same loss curve as the nn.Linear + activation model and reaches the
same accuracy."""
import pytest
import torch
from torch import nn

import fastlayers as fl
from conftest import INTERPRETED

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn ships the digits dataset")


def make(fused: bool) -> nn.Module:
    torch.manual_seed(0)
    if fused:
        return nn.Sequential(fl.FusedLinear(64, 128, activation="gelu"), fl.FusedLinear(128, 64, activation="relu"),
                             fl.FusedLinear(64, 10, activation="none"), fl.LogSoftmax(dim=1))
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
                         nn.LogSoftmax(dim=1))


def train(model: nn.Module, x, y, steps: int = 300):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = nn.functional.nll_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mlp_on_digits_matches_pytorch(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("300 training steps through the Triton interpreter take minutes; the kernels' "
                    "correctness is the op suites' job (this test runs on a GPU)")
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    n_train = 1400
    ref, ours = make(False), make(True)
    for a, b in zip(ref.parameters(), ours.parameters()):  # same init, param for param
        assert torch.equal(a, b)
    ref_losses = train(ref, x[:n_train], y[:n_train])
    our_losses = train(ours, x[:n_train], y[:n_train])
    ref_l, our_l = torch.tensor(ref_losses), torch.tensor(our_losses)
    # fp32 round-off compounds over 300 SGD steps: the curves agree to 1e-3 relative + 1e-4
    torch.testing.assert_close(our_l, ref_l, rtol=1e-3, atol=1e-4)
    assert our_l[-20:].mean() < 0.5 * ref_l[:20].mean()  # it learned
    with torch.no_grad():
        acc = [(m(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item() for m in (ref, ours)]
    assert acc[1] > 0.9
    assert abs(acc[0] - acc[1]) <= 0.01, acc
