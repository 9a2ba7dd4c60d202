"""`netdoctor probe`: parses the options and prints the report; the work is
`netdoctor.probe.session.probe_target` (imported inside, with torch)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from netdoctor.cli.options import (
    common_options,
    download_options,
    exit_code,
    options_from,
    require_html,
    write_reports,
)
from netdoctor.errors import UserError

PROBE_KEYS = {
    "data",
    "data-dir",
    "resize",
    "raw",
    "normalize",
    "steps",
    "batch-size",
    "lr",
    "optimizer",
    "momentum",
    "weight-decay",
    "loss",
    "seed",
    "device",
    "precision",
    "verify",
    "time-budget",
}
PROBE_KEYS |= {"data-mirror", "download"}  # built-in sets: where missing files come from

# Documented defaults (netdoctor probe --help, README): measured, see benchmarks/.
DEFAULTS: dict[str, Any] = {
    "steps": 100,
    "batch-size": 64,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight-decay": 0.0,
    "loss": "cross_entropy",
    "device": "auto",
    "precision": "fp32",
    "time-budget": 60.0,
}


@click.command()
@click.argument("target", required=False)
@common_options
@click.option(
    "--data",
    "data_source",
    metavar="SOURCE",
    help="fashionmnist, mnist, synthetic, FILE.npz or path.py:loader_fn (required).",
)
@click.option(
    "--data-dir",
    metavar="DIR",
    help="Folder holding FashionMNIST/raw, MNIST/raw "
    "(default: $NETDOCTOR_DATA_DIR, else ~/.cache/netdoctor/data).",
)
@download_options
@click.option("--resize", type=int, metavar="N", help="Resize images to NxN.")
@click.option(
    "--raw",
    is_flag=True,
    default=None,
    help="Built-in sets: serve the stored 0..255 values (default: [0, 1]).",
)
@click.option(
    "--normalize",
    is_flag=True,
    default=None,
    help="Built-in sets: per-channel mean/std normalization.",
)
@click.option(
    "--steps",
    type=int,
    help="Training steps (default 100, fewer when a step is too slow for --time-budget).",
)
@click.option(
    "--time-budget",
    type=float,
    metavar="SECONDS",
    help="Wall time for the whole probe when --steps is not given: steps (and for big "
    "models the batch and the extra checks) are scaled to fit (default 60).",
)
@click.option("--batch-size", type=int, help="Samples per batch (default 64).")
@click.option(
    "--lr", type=float, help="Learning rate (default 0.01 for sgd, 0.001 for adam/adamw)."
)
@click.option(
    "--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), help="Optimizer (default sgd)."
)
@click.option("--momentum", type=float, help="SGD momentum (default 0.9).")
@click.option("--weight-decay", type=float, help="Weight decay (default 0; adamw 0.01).")
@click.option(
    "--loss",
    "loss_name",
    type=click.Choice(["cross_entropy", "mse", "bce"]),
    help="Loss (default cross_entropy; bce takes logits).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="auto (default): CUDA when present, else CPU.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    help="fp32 (default); fp16: forward and loss under torch.autocast(float16) with a "
    "GradScaler; bf16: autocast(bfloat16). Parameters stay float32.",
)
@click.option("--no-verify", is_flag=True, help="Do not re-run the probe with the top fix.")
@click.option("--plot", metavar="FILE.png", help="Draw the gradient-flow plot (needs matplotlib).")
def probe(
    target,
    args,
    kwargs_json,
    input_shape,
    input_dtype,
    fmt,
    output,
    html,
    fail_on,
    select,
    ignore_,
    config,
    color,
    seed,
    data_source,
    data_dir,
    resize,
    raw,
    normalize,
    steps,
    batch_size,
    lr,
    optimizer,
    momentum,
    weight_decay,
    loss_name,
    device,
    precision,
    no_verify,
    plot,
    no_download,
    data_mirror,
    time_budget,
):
    """Short instrumented training run of TARGET (file.py:Name) on --data: measures gradient
    flow and training dynamics, diagnoses them and verifies the top fix.

    \b
      netdoctor probe model.py:Net --data fashionmnist --data-dir ./data
      netdoctor probe mlp.py:MLP --data fashionmnist --raw --lr 0.5 --momentum 0
      netdoctor probe model.py:Net --data synthetic --input-shape 3,32,32 --format json
      netdoctor probe model.py:Net --data synthetic --precision fp16
      netdoctor probe model.py:Net --data synthetic --html report.html
    """
    started = time.monotonic()  # the time budget counts the whole command
    from netdoctor.config import load_config

    cfg = load_config(config)
    table = dict(cfg.probe)
    unknown = sorted(set(table) - PROBE_KEYS)
    if unknown:
        raise UserError(
            f"unknown key(s) in [tool.netdoctor.probe]: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(PROBE_KEYS))})"
        )

    def pick(cli_value: Any, key: str) -> Any:
        if cli_value is not None:
            return cli_value
        return table.get(key, DEFAULTS.get(key))

    target = target or (cfg.targets[0] if len(cfg.targets) == 1 else None)
    if not target:
        raise UserError("no target given: netdoctor probe path/to/model.py:ClassName --data SOURCE")
    data_source = pick(data_source, "data")
    if not data_source:
        raise UserError(
            "no data given: pass --data fashionmnist|mnist|synthetic|FILE.npz|"
            "path.py:loader_fn (the probe trains on it)"
        )
    fmt = fmt or cfg.format or "text"
    require_html(fmt, html)
    if plot:
        from netdoctor.report.plot import require_matplotlib

        require_matplotlib()
    if seed is None and "seed" in table:  # a probe-only seed overrides [tool.netdoctor] seed
        from netdoctor.loading.seeding import parse_seed

        seed = parse_seed(table["seed"], "[tool.netdoctor.probe] seed")
    opts = options_from(cfg, args, kwargs_json, input_shape, input_dtype, select, ignore_, seed)
    from netdoctor.probe.settings import ProbeSettings

    settings = ProbeSettings(
        data=data_source,
        data_dir=pick(data_dir, "data-dir"),
        resize=pick(resize, "resize"),
        raw=bool(pick(raw, "raw")),
        normalize=bool(pick(normalize, "normalize")),
        steps=int(pick(steps, "steps")),
        batch_size=int(pick(batch_size, "batch-size")),
        batch_given=batch_size is not None or "batch-size" in table,
        lr=pick(lr, "lr"),
        optimizer=pick(optimizer, "optimizer"),
        momentum=float(pick(momentum, "momentum")),
        weight_decay=float(pick(weight_decay, "weight-decay")),
        loss=pick(loss_name, "loss"),
        device=pick(device, "device"),
        precision=str(pick(precision, "precision")),
        verify=not no_verify and bool(table.get("verify", True)),
        started=started,
        download=not no_download and bool(table.get("download", True)),
        data_mirror=pick(data_mirror, "data-mirror"),
        plot=plot,
    )
    steps_given = steps is not None or "steps" in table
    budget = pick(time_budget, "time-budget")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise UserError(f"time-budget must be a number of seconds, got {budget!r}") from None
    if not budget > 0:
        raise UserError(f"--time-budget must be a positive number of seconds, got {budget:g}")
    settings.time_budget = None if steps_given else budget
    from netdoctor.loading.seeding import seeded
    from netdoctor.probe.session import probe_target

    with seeded(opts.seed):  # user code drawing from random or NumPy during the probe, too
        report, _ = probe_target(target, opts, settings)
    write_reports([report], fmt, output, color, html)
    sys.exit(exit_code([report], fail_on or cfg.fail_on))
