"""A tiny model and cheap evaluators for the search tests, at module level so that worker
processes (a spawned process pool, a Dask cluster) unpickle them by reference."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Coupled groups (a residual add), a concat, a zero-padded conv, a probe output that pins two
    channels of c2, and a classifier (pinned: a graph output)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 1)
        self.c3 = nn.Conv2d(12, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 16, 3, stride=2)
        self.c5 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.c2(a))
        r = a + self.c3(h)                       # c1 and c3 write one residual stream
        y = torch.cat([torch.relu(self.c4(r)).mean((2, 3)), torch.relu(self.c5(r)).mean((2, 3))], 1)
        return self.fc(y), h[:, :2].mean((2, 3))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():
        model.b1.running_mean.uniform_(-0.5, 0.5)
        model.b1.running_var.uniform_(0.5, 1.5)
    return model


class OutputMatch:
    """Minus the mean squared difference of the logits from the dense model's, on fixed inputs:
    deterministic, continuous, cheap. Counts its calls (in this process)."""

    def __init__(self, model, n: int = 32, seed: int = 1, fail_after: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=gen)
        with torch.no_grad():
            self.ref = model(self.x)[0]
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, model) -> float:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("interrupted (test)")
        with torch.no_grad():
            return -float((model(self.x)[0] - self.ref).pow(2).mean())


class ShortFinetune:
    """A few SGD steps towards the dense model's logits (seeded by the search)."""

    def __init__(self, teacher_inputs, teacher_outputs, steps: int = 2):
        self.x, self.y, self.steps = teacher_inputs, teacher_outputs, steps

    def __call__(self, model) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        for _ in range(self.steps):
            idx = torch.randint(0, len(self.x), (8,))
            loss = (model(self.x[idx])[0] - self.y[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()


def admm_trainer(model, optimizer, criterion, epoch) -> None:
    """ADMMPruner's trainer signature: one step on seeded random data."""
    gen = torch.Generator().manual_seed(epoch)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    loss = model(x)[0].pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
