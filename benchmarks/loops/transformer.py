"""A small transformer encoder classifier (4 pre-norm layers, d_model 256, 4 heads, FFN 1024;
5.2M parameters, 2M of them the token embedding) on padded token sequences of length 128,
batch 8, with a key padding mask: AdamW, linear warm-up then cosine, gradient clipping,
cross-entropy, the loss read every step. Synthetic (learnable) data held in memory, so the
step is all model.

`--precision fp16` runs the forward and the loss under torch.autocast(float16) with a
GradScaler (scale -> backward -> unscale_ -> clip -> step -> update), `bf16` under
torch.autocast(bfloat16) without a scaler; `--device cuda` trains on the GPU."""

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from _timing import StepTimer
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--length", type=int, default=128)
parser.add_argument("--timings")
parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

torch.manual_seed(0)
VOCAB, PAD, CLASSES, DIM = 8000, 0, 4, 256


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, args.length, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(
            DIM, 4, 4 * DIM, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, tokens, padding):
        x = self.encoder(self.embed(tokens) + self.pos, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((self.norm(x) * keep).sum(1) / keep.sum(1))


def batch():
    """Token sequences whose class (of 4) is which quarter of the vocabulary half their tokens
    come from: learnable."""
    labels = torch.randint(0, CLASSES, (args.batch,))
    tokens = torch.randint(1, VOCAB, (args.batch, args.length))
    own = labels.unsqueeze(1) * (VOCAB // CLASSES) + torch.randint(
        1, VOCAB // CLASSES, (args.batch, args.length)
    )
    tokens = torch.where(torch.rand(args.batch, args.length) < 0.5, own, tokens)
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch,))
    padding = torch.arange(args.length) >= lengths.unsqueeze(1)
    tokens[padding] = PAD
    return tokens, padding, labels


data = [tuple(t.to(args.device) for t in batch()) for _ in range(8)]
model = Encoder().to(args.device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
warmup = max(1, args.steps // 10)


def schedule(s):
    return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(1, args.steps)))


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
scaler = torch.amp.GradScaler(args.device) if args.precision == "fp16" else None


def autocast():
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(args.device, dtype=dtype)


timer = StepTimer(args.timings)
model.train()
for step in range(args.steps):
    tokens, padding, labels = data[step % len(data)]
    with timer:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(tokens, padding), labels)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        running = loss.item()
timer.write()
