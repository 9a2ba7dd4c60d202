"""The checks made once the probe's run is over: train- vs eval-mode outputs (BatchNorm running
statistics, `train_eval_gap`) and Karpathy's overfit-one-batch run on a fresh copy
(`overfit_one_batch`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netdoctor.loading.forward import main_output, preserved_buffers, preserved_modes
from netdoctor.measure.targets import compute_loss
from netdoctor.probe.config import ProbeConfig

if TYPE_CHECKING:
    from rich.progress import Progress


def _bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def train_eval_gap(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    settle: Iterator[torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """Outputs on one batch with BatchNorm in train mode (batch statistics) vs eval mode
    (running statistics); dropout stays off in both. Buffers and momenta are restored.

    First the running statistics are re-estimated for the final weights from a few batches
    (`settle`): layers with momentum > 0 average them (as they would after more training),
    layers with momentum 0 cannot update, which is the point. So the gap measures running
    statistics that cannot follow the data (momentum 0, tiny or unrepresentative batches), not
    the lag behind weights that changed during a short probe."""
    bns = _bn_layers(model)
    if not bns:
        return None
    moms = {n: m.momentum for n, m in bns}
    per_layer: dict[str, float] = {}

    def stat_hook(name: str) -> Callable[[_BatchNorm, tuple[Any, ...]], None]:
        def hook(mod: _BatchNorm, args: tuple[Any, ...]) -> None:
            t = args[0].detach().float() if args and isinstance(args[0], torch.Tensor) else None
            rm, rv = mod.running_mean, mod.running_var  # not None: tracked running statistics
            if t is None or t.dim() < 2 or rm is None or rv is None:
                return
            dims = [d for d in range(t.dim()) if d != 1]
            mean = t.mean(dim=dims)
            var = t.var(dim=dims, unbiased=False)
            rm, rv = rm.float(), rv.float()
            z = ((mean - rm).abs() / (var + mod.eps).sqrt()).mean()
            r = ((var + mod.eps) / (rv + mod.eps)).log().abs().mean()
            per_layer[name] = float(z + r)

        return hook

    handles = []
    settled = 0
    try:
        with preserved_modes(model), preserved_buffers([m for _, m in bns]), torch.no_grad():
            model.eval()
            if settle is not None:
                for _, m in bns:
                    m.train()
                    if m.momentum != 0:
                        m.reset_running_stats()
                        m.momentum = None  # cumulative average over the settle batches
                for xs in settle:
                    model(xs)
                    settled += 1
                for n, m in bns:
                    m.momentum = moms[n]
                    m.eval()
            out_eval = main_output(model(x))
            for name, m in bns:
                m.train()
                handles.append(m.register_forward_pre_hook(stat_hook(name)))
            out_train = main_output(model(x))
    finally:
        for h in handles:
            h.remove()
        for n, m in bns:
            m.momentum = moms[n]
    if out_eval is None or out_train is None:
        return None
    a, b = out_train.float(), out_eval.float()
    gap = (
        float((a - b).norm() / (a.norm() + 1e-12))
        if bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
        else float("inf")
    )
    res: dict[str, Any] = {
        "relative_gap": gap,
        "bn_layers": [n for n, _ in bns],
        "layer_mismatch": per_layer,
        "momentum": moms,
        "settle_batches": settled,
    }
    try:
        lt, ct = compute_loss(loss, a, y)
        le, ce = compute_loss(loss, b, y)
        res.update(loss_train_mode=float(lt), loss_eval_mode=float(le))
        if ct is not None and ce is not None:
            count = y.numel()
            res.update(accuracy_train_mode=float(ct) / count, accuracy_eval_mode=float(ce) / count)
    except Exception:  # the gap itself is what matters
        pass
    return res


def overfit_one_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ProbeConfig,
    device: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any] | None:
    """Karpathy's check: a fresh copy trained on one small fixed batch with Adam must drive the
    loss far down. Independent of the probe's optimizer and lr, so it tests the model and the
    data/loss wiring, not the hyperparameters."""
    n = min(config.overfit_samples, x.shape[0])
    xb, yb = x[:n], y[:n]
    torch.manual_seed(config.seed)
    net = copy.deepcopy(model).to(device)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.overfit_lr)
    losses: list[float] = []
    acc = None
    task = (
        progress.add_task("overfit one batch", total=config.overfit_steps)
        if progress is not None
        else None
    )
    try:
        for _ in range(config.overfit_steps):
            opt.zero_grad(set_to_none=True)
            logits = main_output(net(xb))
            if logits is None:
                return None
            loss, correct = compute_loss(config.loss, logits.float(), yb)
            v = float(loss.detach())
            losses.append(v)
            if correct is not None:
                acc = float(correct) / yb.numel()
            if not math.isfinite(v):
                break
            loss.backward()
            opt.step()
            if progress is not None and task is not None:
                progress.update(task, advance=1)
    finally:
        if progress is not None and task is not None:
            progress.remove_task(task)
    if not losses:
        return None
    best = min((v for v in losses if math.isfinite(v)), default=float("nan"))
    return {
        "samples": n,
        "steps": len(losses),
        "lr": config.overfit_lr,
        "optimizer": "adam",
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_min": best,
        "accuracy": acc,
        "losses": losses,
    }
