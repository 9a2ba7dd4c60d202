"""Which init pathologies of LLM-scale models deserve a static rule? The evidence behind ND205 and
behind the rules that were not written (docs/check.md, "Init at LLM scale").

    python benchmarks/scale_init_evidence.py logits     # seconds
    python benchmarks/scale_init_evidence.py stream     # ~1 minute: HF configs at 24-80 layers
    python benchmarks/scale_init_evidence.py tied       # ~5 minutes on one core
    python benchmarks/scale_init_evidence.py depth --steps 200   # ~10 minutes on one core

* logits -- the logits of an output layer tied to an embedding, fed a normalized (unit-RMS)
  hidden state, for the embedding inits in use: nn.Embedding's default N(0, 1), GPT-2 / Hugging
  Face's N(0, 0.02), tensor2tensor's N(0, d^-1/2), and the default init of an nn.Linear whose
  weight the embedding takes over. Measured: the logits' RMS and the cross-entropy against
  uniform random targets, next to ln(V) and the random-energy-model prediction
  (`initial_cross_entropy`: ln V + s^2/2 below s = sqrt(2 ln V), s sqrt(2 ln V) above).
* stream -- the residual stream's RMS after each block at initialization, for Hugging Face
  configs built at a reduced width (256) with their init std scaled by sqrt(real width / 256)
  so each layer keeps its real gain: Llama-7B's 32 layers and Llama-70B's 80 (std 0.02, no
  depth scaling), GPT-2 XL's 48 (output projections at 0.02 / sqrt(2 n_layer)) and the same
  without that scaling, BERT-large's 24 post-LN layers.
* tied -- a 4-layer pre-LN GPT (width 128, vocabulary 4096, tied embeddings) trained 300 AdamW
  steps on a synthetic order-1 Markov corpus, once per embedding init (the published ones, and
  N(0, s / sqrt(d)) for logits of RMS s = 3, 5, 8): the loss at init, after 50, 100, 200 and
  300 steps, against the corpus' entropy floor.
* depth -- a 32-layer pre-LN GPT (width 64, vocabulary 512) trained on the same kind of corpus,
  GPT-2's scheme against the same without depth scaling, at GPT-2-small's and at Llama-7B's
  per-layer gain (the docs quote `--steps 200`).

`-k TEXT` runs only the tied or depth cases whose name contains TEXT.

Synthetic data, CPU, one thread, seeded: the numbers are reproducible on one torch version.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


def initial_cross_entropy(s: float, classes: int) -> float:
    """Expected cross-entropy of V i.i.d. N(0, s^2) logits against a target they know nothing of:
    E[log sum exp z] (the random energy model's free energy, exact as V grows)."""
    critical = math.sqrt(2 * math.log(classes))
    if s <= critical:
        return math.log(classes) + s * s / 2
    return s * critical


# ------------------------------------------------------------------------------------ logits


def logits_table() -> None:
    print("d      V      embedding init                s (logit RMS)  CE at init  REM     ln V")
    g = torch.Generator().manual_seed(0)
    for d, vocab in ((128, 4096), (768, 50257), (2048, 32000), (4096, 32000), (8192, 32000)):
        h = F.layer_norm(torch.randn(64, d, generator=g), (d,))
        targets = torch.randint(0, vocab, (64,), generator=g)
        inits = {
            "nn.Embedding default N(0,1)": 1.0,
            "GPT-2 / HF N(0,0.02)": 0.02,
            "tensor2tensor N(0,d^-1/2)": d**-0.5,
            "nn.Linear default U(+-1/sqrt d)": 1 / math.sqrt(3 * d),
        }
        for name, std in inits.items():
            w = torch.randn(vocab, d, generator=g) * std
            z = h @ w.T
            s = float(z.square().mean().sqrt())
            ce = float(F.cross_entropy(z, targets))
            print(
                f"{d:<6} {vocab:<6} {name:31} {s:12.3g} {ce:11.3g} "
                f"{initial_cross_entropy(s, vocab):7.3g} {math.log(vocab):6.3g}"
            )


# ------------------------------------------------------------------------------------ stream


def _stream_rms(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor) -> list[float]:
    seen: list[float] = []

    def hook(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        seen.append(float(out.float().square().mean().sqrt()))

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return seen


def stream_table() -> None:
    import transformers as tf

    width, vocab = 256, 1000
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))

    def llama(layers: int, real_width: int, ffn_ratio: float):
        cfg = tf.LlamaConfig(
            hidden_size=width,
            intermediate_size=int(width * ffn_ratio),
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=vocab,
            initializer_range=0.02 * math.sqrt(real_width / width),
        )
        m = tf.LlamaForCausalLM(cfg).eval()
        return m, m.model.layers

    def gpt2(layers: int, real_width: int, scaled: bool):
        cfg = tf.GPT2Config(
            n_embd=width,
            n_layer=layers,
            n_head=4,
            vocab_size=vocab,
            n_positions=128,
            initializer_range=0.02 * math.sqrt(real_width / width),
        )
        m = tf.GPT2LMHeadModel(cfg).eval()
        if not scaled:  # every c_proj at the plain std, as Llama's init does
            for block in m.transformer.h:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    nn.init.normal_(proj.weight, std=cfg.initializer_range)
        return m, m.transformer.h

    def bert(layers: int, real_width: int):
        cfg = tf.BertConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=4 * width,
            vocab_size=vocab,
            initializer_range=0.02 * math.sqrt(real_width / width),
        )
        m = tf.BertModel(cfg, add_pooling_layer=False).eval()
        return m, m.encoder.layer

    cases = {
        "Llama-7B (32 layers, 0.02, no depth scaling)": lambda: llama(32, 4096, 11008 / 4096),
        "Llama-70B (80 layers, 0.02, no depth scaling)": lambda: llama(80, 8192, 28672 / 8192),
        "GPT-2 XL (48 layers, c_proj / sqrt(2N))": lambda: gpt2(48, 1600, True),
        "GPT-2 XL without the depth scaling": lambda: gpt2(48, 1600, False),
        "GPT-2 XL at 80 layers without it": lambda: gpt2(80, 1600, False),
        "BERT-large (24 post-LN layers)": lambda: bert(24, 1024),
    }
    print(f"{'model (width 256, per-layer gain kept)':48} block 1   mid      last     last/1")
    for name, build in cases.items():
        torch.manual_seed(0)
        model, blocks = build()
        rms = _stream_rms(model, blocks, tokens)
        mid = rms[len(rms) // 2]
        print(f"{name:48} {rms[0]:<8.3g} {mid:<8.3g} {rms[-1]:<8.3g} {rms[-1] / rms[0]:.3g}")


# ------------------------------------------------------------------------------------ models


class Block(nn.Module):
    def __init__(self, d: int, heads: int, post_norm: bool) -> None:
        super().__init__()
        self.heads, self.post_norm = heads, post_norm
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).chunk(3, -1)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.n1(x + self.attend(x))
            return self.n2(x + self.down(F.gelu(self.up(x))))
        x = x + self.attend(self.n1(x))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class GPT(nn.Module):
    """A nanoGPT-style decoder. `emb_std`: the token embedding's init (None: nn.Embedding's
    N(0, 1)); `std`: every Linear; `proj_std`: the residual branches' output projections;
    `tied`: the output layer uses the embedding's weight; `logit_scale`: a factor on the logits
    (T5 multiplies by d^-1/2 when tied)."""

    def __init__(
        self,
        vocab: int,
        d: int,
        layers: int,
        *,
        std: float,
        proj_std: float,
        emb_std: float | None,
        tied: bool = True,
        post_norm: bool = False,
        logit_scale: float = 1.0,
        seq: int = 64,
    ) -> None:
        super().__init__()
        self.logit_scale = logit_scale
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, 4, post_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "blocks" in name:
                nn.init.normal_(
                    p, std=proj_std if name.endswith(("proj.weight", "down.weight")) else std
                )
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.pos.weight, std=0.02)
        if emb_std is not None:
            nn.init.normal_(self.tok.weight, std=emb_std)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.tok(t) + self.pos.weight[: t.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) * self.logit_scale


class MarkovCorpus:
    """An order-1 or order-2 Markov chain over `vocab` tokens: each context (the previous token,
    or the previous two hashed into `contexts`) has 4 possible successors, drawn with
    probabilities 0.5, 0.25, 0.15, 0.1 (entropy 1.21 nats: the floor of the loss)."""

    PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])

    def __init__(self, vocab: int, order: int = 2, contexts: int = 8192, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.order = vocab, order
        self.contexts = vocab if order == 1 else contexts
        # drawn for `contexts` rows whatever the order: the tables quoted in the docs used it
        self.successors = torch.randint(0, vocab, (contexts, 4), generator=g)

    @property
    def entropy(self) -> float:
        return float(-(self.PROBS * self.PROBS.log()).sum())

    def batch(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        seq = torch.randint(0, self.vocab, (n, 2), generator=g)
        for _ in range(length - 2):
            if self.order == 1:
                ctx = seq[:, -1]
            else:
                ctx = (seq[:, -2] * 7919 + seq[:, -1]) % self.contexts
            pick = torch.multinomial(self.PROBS, n, replacement=True, generator=g)
            seq = torch.cat([seq, self.successors[ctx, pick][:, None]], 1)
        return seq


def train(model: GPT, corpus: MarkovCorpus, steps: int, lr: float, marks: tuple[int, ...]):
    """AdamW (weight decay 0.1, betas 0.9/0.95), 10% linear warmup, batch 16 x 64: the loss at
    init and, at each mark, the mean of the last 10 steps' losses; the time per step."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 10)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm)
        seq = corpus.batch(16, 65, g)
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    per_step = (time.perf_counter() - start) / steps
    at = [losses[0]] + [sum(losses[m - 10 : m]) / 10 for m in marks]
    return at, per_step


def tied_table(steps: int, lr: float, only: str) -> None:
    vocab, d = 4096, 128
    corpus = MarkovCorpus(vocab, order=1)
    marks = (50, 100, 200, steps)
    gpt2 = 0.02 * math.sqrt(768 / d)  # GPT-2 small's per-layer gain at width 128
    cases = {
        "tied, nn.Embedding default N(0,1)": dict(emb_std=None),
        "tied, N(0,1), logits x d^-1/2 (T5)": dict(emb_std=None, logit_scale=d**-0.5),
        "tied, N(0,0.02) scaled (GPT-2)": dict(emb_std=gpt2),
        "tied, N(0,d^-1/2) (tensor2tensor)": dict(emb_std=d**-0.5),
        "untied, N(0,1) + default head": dict(emb_std=None, tied=False),
        **{f"tied, N(0,{s}/sqrt(d)): logit RMS ~{s}": dict(emb_std=s / d**0.5) for s in (3, 5, 8)},
    }
    print(f"entropy floor {corpus.entropy:.3f}, ln V = {math.log(vocab):.3f}; loss at step:")
    print(f"{'case':38} {'logit s':>8} {'0':>7}" + "".join(f"{m:>7}" for m in marks))
    for name, kw in cases.items():
        if only not in name:
            continue
        torch.manual_seed(0)
        model = GPT(vocab, d, 4, std=gpt2, proj_std=gpt2 / math.sqrt(8), **kw)
        with torch.no_grad():
            s = float(model(corpus.batch(8, 64, torch.Generator().manual_seed(2))).std())
        at, per_step = train(model, corpus, steps, lr, marks)
        print(f"{name:38} {s:8.3g}" + "".join(f"{v:7.3f}" for v in at), f"({per_step:.2f} s/step)")


def depth_table(steps: int, layers: int, lr: float, only: str) -> None:
    vocab, d = 512, 64
    corpus = MarkovCorpus(vocab, order=1)
    marks = (50, 100, steps)
    gpt2, llama = 0.02 * math.sqrt(768 / d), 0.02 * math.sqrt(4096 / d)
    scaled = 1 / math.sqrt(2 * layers)
    cases = {
        "pre-LN, GPT-2 gain, proj / sqrt(2N)": dict(std=gpt2, proj_std=gpt2 * scaled),
        "pre-LN, GPT-2 gain, no depth scaling": dict(std=gpt2, proj_std=gpt2),
        "pre-LN, Llama-7B gain, no depth scaling": dict(std=llama, proj_std=llama),
        "pre-LN, Llama-7B gain, proj / sqrt(2N)": dict(std=llama, proj_std=llama * scaled),
    }
    print(f"{layers} layers; entropy floor {corpus.entropy:.3f}, ln V = {math.log(vocab):.3f}")
    print(f"{'case':42} {'stream last/1':>13} {'0':>7}" + "".join(f"{m:>7}" for m in marks))
    tokens = corpus.batch(4, 64, torch.Generator().manual_seed(2))
    for name, kw in cases.items():
        if only not in name:
            continue
        torch.manual_seed(0)
        model = GPT(vocab, d, layers, emb_std=gpt2, **kw)
        rms = _stream_rms(model, model.blocks, tokens)
        at, per_step = train(model, corpus, steps, lr, marks)
        print(
            f"{name:42} {rms[-1] / rms[0]:13.3g}" + "".join(f"{v:7.3f}" for v in at),
            f"({per_step:.2f} s/step)",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("logits", "stream", "tied", "depth"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=32, help="depth: the model's layers")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate")
    parser.add_argument("-k", default="", help="tied, depth: only the cases containing this text")
    args = parser.parse_args()
    if args.part == "logits":
        logits_table()
    elif args.part == "stream":
        stream_table()
    elif args.part == "tied":
        tied_table(args.steps, args.lr, args.k)
    else:
        depth_table(args.steps, args.layers, args.lr, args.k)


if __name__ == "__main__":
    main()
