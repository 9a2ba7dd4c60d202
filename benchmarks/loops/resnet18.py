"""A standard ResNet-18 (ImageNet layout: 7x7 stem, max-pool, four stages of two basic blocks,
11.2M parameters) trained on 10 classes of 3x32x32 images, batch 32: SGD with momentum and
weight decay, cross-entropy, a cosine schedule stepped per batch, the loss read every step for
logging. Synthetic (learnable) data held in memory, so the step is all model (the benchmark's
worst case for a per-step overhead). `--device cuda` trains on the GPU."""

import argparse

import torch
import torch.nn.functional as F
from _timing import StepTimer
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--size", type=int, default=32)
parser.add_argument("--timings")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

torch.manual_seed(0)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def batch():
    """Noise images whose class (of 10) is set by their per-channel means: learnable."""
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    x += PALETTE[y].view(-1, 3, 1, 1)
    return x, y


PALETTE = torch.randn(10, 3)
data = [tuple(t.to(args.device) for t in batch()) for _ in range(8)]
model = ResNet18().to(args.device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
timer = StepTimer(args.timings)
model.train()
for step in range(args.steps):
    x, y = data[step % len(data)]
    with timer:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = loss.item()
timer.write()
