"""Does a small initialization along a path hurt training? The evidence behind ND201's paths.

    python benchmarks/init_training.py              # 3 seeds, about 3 minutes on one core
    python benchmarks/init_training.py --seeds 5

Trains each model twice from the same seed, once with its small init and once with the fix ND201
would suggest (He for layers followed by ReLU, LeCun for the output layer), with SGD (momentum
0.9) and with AdamW, and prints the held-out accuracy after a fixed number of steps:

  * head   -- a DistilBERT-style encoder (hidden 64, 2 post-norm layers, N(0, 0.02) everywhere)
              whose two-layer head, pre_classifier + ReLU + classifier, starts right after a
              LayerNorm: 8.8x and 6.3x below scale, 55x along the path. Task: is a token below
              10 among the 16 at least twice (chance 51%).
  * mlp2   -- 784-300-10 ReLU MLP from the input, N(0, 0.01) (the seed's MLP; 29x).
  * mlp3   -- 784-300-300-10, N(0, 0.01): three small layers in series (~300x).
              Task for both: 10 Gaussian classes in 784 dimensions, standardized inputs.

Synthetic data, CPU, one thread; rules/ND201.md quotes the result.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.n1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.n2(x + self.down(torch.relu(self.up(x))))


class Encoder(nn.Module):
    def __init__(self, small: bool, d: int = 64) -> None:
        super().__init__()
        self.emb, self.pos, self.norm = nn.Embedding(100, d), nn.Embedding(16, d), nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.pre, self.cls = nn.Linear(d, d), nn.Linear(d, 2)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        if not small:
            nn.init.kaiming_normal_(self.pre.weight, nonlinearity="relu")
            nn.init.kaiming_normal_(self.cls.weight, nonlinearity="linear")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.emb(t) + self.pos.weight[None])
        for block in self.blocks:
            x = block(x)
        return self.cls(torch.relu(self.pre(x[:, 0])))


def tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, 100, (n, 16), generator=g)
    return t, ((t < 10).sum(1) >= 2).long()


def mlp(small: bool, depth: int) -> nn.Module:
    dims = [784] + [300] * (depth - 1) + [10]
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(dims[i], dims[i + 1])
        last = i == depth - 1
        if small:
            nn.init.normal_(linear.weight, std=0.01)
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="linear" if last else "relu")
        nn.init.zeros_(linear.bias)
        layers += [linear] if last else [linear, nn.ReLU()]
    return nn.Sequential(*layers)


_MEANS = torch.randn(10, 784, generator=torch.Generator().manual_seed(0)) * 0.15


def gaussians(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.randn(n, 784, generator=g) + _MEANS[y], y


# name: (build(small), data, steps, SGD lr, AdamW lr)
CASES = {
    "head": (lambda small: Encoder(small), tokens, 400, 0.05, 1e-3),
    "mlp2": (lambda small: mlp(small, 2), gaussians, 150, 0.01, 1e-3),
    "mlp3": (lambda small: mlp(small, 3), gaussians, 150, 0.01, 1e-3),
}


def accuracy(case: str, small: bool, optimizer: str, seed: int) -> float:
    build, data, steps, sgd_lr, adam_lr = CASES[case]
    torch.manual_seed(seed)
    model = build(small)
    g = torch.Generator().manual_seed(1000 + seed)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), sgd_lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), adam_lr)
    for _ in range(steps):
        x, y = data(64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = data(2000, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("-k", default="", help="only cases containing this text")
    args = parser.parse_args()
    print(f"{'case':6} {'optimizer':9} {'small init':>24} {'He/LeCun init':>24}")
    for case in CASES:
        if args.k not in case:
            continue
        for optimizer in ("sgd", "adamw"):
            cells = []
            for small in (True, False):
                accs = [accuracy(case, small, optimizer, s) for s in range(args.seeds)]
                cells.append(" ".join(f"{a:.2f}" for a in accs))
            print(f"{case:6} {optimizer:9} {cells[0]:>24} {cells[1]:>24}", flush=True)


if __name__ == "__main__":
    main()
