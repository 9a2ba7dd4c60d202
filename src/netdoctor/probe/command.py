"""`netdoctor probe`: the click command. Torch (and the engine) are imported inside the function,
so importing this module (done by netdoctor.cli for `--help`) stays light."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from netdoctor.cli import _common_options, _emit, _exit_code, _options_from
from netdoctor.errors import UserError

PROBE_KEYS = {"data", "data-dir", "resize", "raw", "normalize", "steps", "batch-size", "lr",
              "optimizer", "momentum", "weight-decay", "loss", "seed", "device", "verify"}

# Documented defaults (netdoctor probe --help, README): measured, see benchmarks/.
DEFAULTS: dict[str, Any] = {"steps": 100, "batch-size": 64, "optimizer": "sgd", "momentum": 0.9,
                            "weight-decay": 0.0, "loss": "cross_entropy", "seed": 0,
                            "device": "auto"}


@click.command()
@click.argument("target", required=False)
@_common_options
@click.option("--data", "data_source", metavar="SOURCE",
              help="fashionmnist, mnist, synthetic, FILE.npz or path.py:loader_fn (required).")
@click.option("--data-dir", metavar="DIR", help="Folder holding FashionMNIST/raw, MNIST/raw.")
@click.option("--resize", type=int, metavar="N", help="Resize images to NxN.")
@click.option("--raw", is_flag=True, default=None,
              help="Built-in sets: serve the stored 0..255 values (default: [0, 1]).")
@click.option("--normalize", is_flag=True, default=None,
              help="Built-in sets: per-channel mean/std normalization.")
@click.option("--steps", type=int, help="Training steps (default 100).")
@click.option("--batch-size", type=int, help="Samples per batch (default 64).")
@click.option("--lr", type=float,
              help="Learning rate (default 0.01 for sgd, 0.001 for adam/adamw).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]),
              help="Optimizer (default sgd).")
@click.option("--momentum", type=float, help="SGD momentum (default 0.9).")
@click.option("--weight-decay", type=float, help="Weight decay (default 0; adamw 0.01).")
@click.option("--loss", "loss_name", type=click.Choice(["cross_entropy", "mse", "bce"]),
              help="Loss (default cross_entropy; bce takes logits).")
@click.option("--seed", type=int, help="Seed for the model's construction, data order and "
                                       "dropout (default 0).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto (default): CUDA when present, else CPU.")
@click.option("--no-verify", is_flag=True, help="Do not re-run the probe with the top fix.")
@click.option("--plot", metavar="FILE.png", help="Draw the gradient-flow plot (needs matplotlib).")
def probe(target, args, kwargs_json, input_shape, input_dtype, fmt, output, fail_on, select,
          ignore_, config, color, data_source, data_dir, resize, raw, normalize, steps,
          batch_size, lr, optimizer, momentum, weight_decay, loss_name, seed, device, no_verify,
          plot):
    """Short instrumented training run of TARGET (file.py:Name) on --data: measures gradient
    flow and training dynamics, diagnoses them and verifies the top fix.

    \b
      netdoctor probe model.py:Net --data fashionmnist --data-dir ./data
      netdoctor probe mlp.py:MLP --data fashionmnist --raw --lr 0.5 --momentum 0
      netdoctor probe model.py:Net --data synthetic --input-shape 3,32,32 --format json
    """
    from netdoctor.config import load_config

    cfg = load_config(config)
    table = dict(cfg.probe)
    unknown = sorted(set(table) - PROBE_KEYS)
    if unknown:
        raise UserError(f"unknown key(s) in [tool.netdoctor.probe]: {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(PROBE_KEYS))})")

    def pick(cli_value, key):
        if cli_value is not None:
            return cli_value
        return table.get(key, DEFAULTS.get(key))

    target = target or (cfg.targets[0] if len(cfg.targets) == 1 else None)
    if not target:
        raise UserError("no target given: netdoctor probe path/to/model.py:ClassName --data SOURCE")
    data_source = pick(data_source, "data")
    if not data_source:
        raise UserError("no data given: pass --data fashionmnist|mnist|synthetic|FILE.npz|"
                        "path.py:loader_fn (the probe trains on it)")
    if plot:
        _require_matplotlib()
    opts = _options_from(cfg, args, kwargs_json, input_shape, input_dtype, select, ignore_)
    settings = {
        "data_dir": pick(data_dir, "data-dir"), "resize": pick(resize, "resize"),
        "raw": bool(pick(raw, "raw")), "normalize": bool(pick(normalize, "normalize")),
        "steps": int(pick(steps, "steps")), "batch_size": int(pick(batch_size, "batch-size")),
        "lr": pick(lr, "lr"), "optimizer": pick(optimizer, "optimizer"),
        "momentum": float(pick(momentum, "momentum")),
        "weight_decay": float(pick(weight_decay, "weight-decay")),
        "loss": pick(loss_name, "loss"), "seed": int(pick(seed, "seed")),
        "device": pick(device, "device"),
        "verify": not no_verify and bool(table.get("verify", True)),
    }
    report, _ = run_command(target, data_source, opts, settings, plot=plot)
    fmt = fmt or cfg.format or "text"
    from netdoctor.report import render

    _emit(render([report], fmt, color=False if output else color), output)
    sys.exit(_exit_code([report], fail_on or cfg.fail_on))


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: "
                        "pip install matplotlib") from None


def run_command(target: str, data_source: str, opts, settings: dict[str, Any],
                plot: str | None = None):
    """Everything `probe` does, minus parsing and printing: returns (Report, ProbeRun|None)."""
    import torch

    from netdoctor.check import check_loaded, run_rules
    from netdoctor.data import DataSpec, open_source
    from netdoctor.loading.target import load
    from netdoctor.probe.diagnose import link_causes
    from netdoctor.probe.engine import ProbeConfig, _progress, run_probe
    from netdoctor.rules import Context
    from netdoctor.suppress import is_suppressed

    config = ProbeConfig(steps=settings["steps"], batch_size=settings["batch_size"],
                         lr=settings["lr"], optimizer=settings["optimizer"],
                         momentum=settings["momentum"], weight_decay=settings["weight_decay"],
                         loss=settings["loss"], seed=settings["seed"], device=settings["device"])
    config.validate()
    torch.manual_seed(config.seed)  # the model's own initialisation is part of the experiment
    result = load(target, opts.kwargs)
    if result.onnx_files and not result.models:
        raise UserError(f"{target}: the probe trains a PyTorch model; an ONNX graph cannot be "
                        "trained (use file.py:ClassName)")
    if not result.models:
        raise UserError(f"{target}: no buildable nn.Module found"
                        + (f" ({'; '.join(result.notes)})" if result.notes else ""))
    if len(result.models) > 1:
        names = ", ".join(m.target for m in result.models)
        raise UserError(f"{target} holds {len(result.models)} models ({names}): the probe trains "
                        "one, name it with file.py:ClassName")
    loaded = result.models[0]

    spec = DataSpec(data_source, data_dir=Path(settings["data_dir"]).expanduser()
                    if settings["data_dir"] else None, batch_size=config.batch_size,
                    resize=settings["resize"], raw=settings["raw"],
                    normalize=settings["normalize"], seed=config.seed,
                    input_shape=opts.input_shape, input_dtype=opts.input_dtype)
    notes: list[str] = list(result.notes)
    if spec.source.strip().lower() == "synthetic":
        _synthetic_spec(spec, loaded.model, notes)
    source = open_source(spec)
    sample = _sample(source, spec, config)
    if opts.input_shape is None and sample is not None and sample.x.dim() >= 2:
        opts.input_shape = tuple(sample.x.shape[1:])
        if not sample.x.is_floating_point() and sample.x.dtype != torch.uint8:
            opts.input_dtype = "long"  # token ids

    report = check_loaded(loaded, opts)
    report.command = "probe"
    report.notes[:0] = notes
    _data_rules(report, loaded, sample, opts)
    report.notes.append(f"probe: {config.describe()}")
    if any(f.rule == "ND002" for f in report.findings):
        report.notes.append("the probe did not train: the model's forward fails on the data's "
                            "shape (ND002)")
        return report, None

    sites = {}
    for name, module in loaded.model.named_modules():
        loc = loaded.provenance.site(module)
        if loc is not None:
            sites[name] = loc
        elif name == "" and loaded.class_location is not None:
            sites[name] = loaded.class_location
    progress = _progress(sys.stderr.isatty())
    from contextlib import nullcontext

    with (progress or nullcontext()):
        try:
            run = run_probe(loaded.model, source, config, sites=sites, progress=progress)
        except UserError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"the model raised during the probe's training step: "
                            f"{type(e).__name__}: {first}") from e
        run.target = loaded.target
        run.prior_rules = {f.rule for f in report.findings}
        if run.stopped in ("labels", "non-finite-input") and run.bad_batch is not None:
            _bad_batch_rules(report, loaded, run, opts)
        if run.stopped == "labels":
            report.notes.append("the probe did not train: the labels do not fit the model's "
                                "outputs (ND303); fix them first")
        ctx = Context(target=loaded.target, run=run, options=opts.rule_options)
        class_lines = [loaded.class_location] if loaded.class_location else []
        for f in run_rules(ctx, {"runtime"}, opts):
            if is_suppressed(f, class_lines):
                report.notes.append(f"{f.rule} at {f.location} suppressed by a netdoctor: "
                                    "ignore comment")
            else:
                report.findings.append(f)
        link_causes(report.findings)
        report.measurements = measurements(run)
        if settings.get("verify", True):
            from netdoctor.probe.verify import verify

            vf, note = verify(loaded.model, source, run, report, progress)
            if vf is not None:
                report.measurements["verified_fix"] = vf
                if not vf["improved"]:
                    report.notes.append(f"the top fix ({vf['rule']}: {vf['applied']}) did not "
                                        "improve the probe's loss on its own")
            if note:
                report.notes.append(note)
    if run.stopped == "non-finite":
        report.notes.append(f"the probe stopped at step {run.steps_run}: non-finite values "
                            "(ND401)")
    if plot:
        write_plot(run, plot, loaded.target)
        report.notes.append(f"gradient-flow plot written to {plot}")
    return report, run


def _synthetic_spec(spec, model, notes: list[str]) -> None:
    """Synthetic data shaped for the model: the input shape (given or inferred), token ids below
    its embedding's vocabulary, and as many classes as it has outputs."""
    from netdoctor.loading.forward import ForwardFailure, example_input, run_forward
    from netdoctor.loading.shapes import first_layer, infer

    vocab = None
    found = first_layer(model)
    if found is not None and hasattr(found[1], "num_embeddings"):
        vocab = int(found[1].num_embeddings)
    if spec.input_shape is None:
        inferred, _, _ = infer(model)
        if inferred is None:
            raise UserError("synthetic data needs an input shape and none could be inferred "
                            "from the model: pass --input-shape C,H,W")
        notes.append(f"synthetic input shape {inferred.describe()} inferred from "
                     f"{inferred.inferred_from}; pass --input-shape to set it")
        spec.input_shape, spec.input_dtype = tuple(inferred.shape), inferred.dtype
        vocab = inferred.vocab or vocab
    if spec.input_dtype in ("long", "int64") and vocab:
        spec.vocab_size = spec.vocab_size or min(vocab, 100)
    if spec.num_classes is None:
        try:
            out = run_forward(model, example_input(tuple(spec.input_shape), spec.input_dtype,
                                                   vocab=vocab))
        except ForwardFailure:
            return
        from netdoctor.loading.forward import main_output

        logits = main_output(out)
        if logits is not None and logits.dim() == 2 and logits.shape[1] >= 2:
            spec.num_classes = int(logits.shape[1])


def _sample(source, spec, config):
    """The first batches, as the data rules see them (with the loss the probe trains with)."""
    try:
        from netdoctor.rules.data import DataSample
    except ImportError:  # pragma: no cover - data rules not available
        return None
    from dataclasses import replace

    return replace(DataSample.from_source(source, spec=spec), loss=config.loss)


def _data_rules(report, loaded, sample, opts) -> None:
    """ND3xx on the first batches, against the model."""
    if sample is None:
        report.notes.append("data rules (ND3xx) are not available in this version")
        return
    from netdoctor.check import check_data

    check_data(report, loaded, sample, opts)


def _bad_batch_rules(report, loaded, run, opts) -> None:
    """The probe stopped on a batch the data rules' sample did not include: check that batch."""
    from netdoctor.check import run_rules
    from netdoctor.rules import Context
    from netdoctor.rules.data import DataSample

    have = {f.rule for f in report.findings}
    x, y = run.bad_batch
    out_shape = None
    sample = DataSample(x=x, y=y, description="the batch the probe stopped on",
                        num_outputs=run.num_outputs, output_shape=out_shape,
                        loss=run.config.loss)
    ctx = Context(target=loaded.target, data=sample, options=opts.rule_options)
    for f in run_rules(ctx, {"data"}, opts):
        if f.rule in ("ND303", "ND304") and f.rule not in have:
            report.findings.append(f)


def measurements(run) -> dict[str, Any]:
    """What the JSON report carries (and the text report draws)."""
    from netdoctor.rules.runtime import gradient_flow, mean

    acts = []
    for a in run.activations:
        w = a.window_steps or run.window
        acts.append({"name": a.name, "kind": a.kind, "module": a.module, "producer": a.producer,
                     "functional": a.functional, "units": a.units or None,
                     "dead_fraction": a.dead_fraction, "dead_units": a.dead_units,
                     "zero_fraction": mean(a.zero_fraction[-w:]) if a.zero_fraction else None,
                     "saturation": mean(a.saturation[-run.window:]) if a.saturation else None,
                     "location": a.location.to_dict() if a.location else None})
    c = run.num_outputs
    out: dict[str, Any] = {
        "gradient_flow": gradient_flow(run) if run.steps_run else [],
        "loss_curve": list(run.loss),
        "accuracy_curve": list(run.accuracy),
        "activations": acts,
        "loss_at_init": run.loss[0] if run.loss else None,
        "expected_initial_loss": math.log(c) if c and c > 1 and run.classification and
        run.config.loss == "cross_entropy" else None,
        "probe": {"steps": run.steps_run, "steps_requested": run.config.steps,
                  "batch_size": run.config.batch_size, "optimizer": run.config.optimizer,
                  "lr": run.config.learning_rate, "momentum": run.config.momentum
                  if run.config.optimizer == "sgd" else None,
                  "weight_decay": run.config.weight_decay, "loss": run.config.loss,
                  "seed": run.config.seed, "device": run.device, "stopped": run.stopped,
                  "timings_s": {k: round(v, 3) for k, v in run.timings.items()}},
    }
    if run.train_eval is not None:
        out["train_eval"] = run.train_eval
    if run.overfit is not None:
        out["overfit"] = run.overfit
    if run.nonfinite is not None:
        from dataclasses import asdict

        out["non_finite"] = asdict(run.nonfinite)
    return out


def write_plot(run, path: str, title: str) -> None:
    """The classic gradient-flow plot (mean and max gradient norm per layer, input -> output)
    next to the loss curve."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netdoctor.rules.runtime import finite, gradient_flow

    rows = gradient_flow(run) if run is not None else []
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    names = [r["name"] for r in rows]
    means = [r["grad_norm"] or 0.0 for r in rows]
    maxes = [r["grad_norm_max"] or 0.0 for r in rows]
    xs = range(len(rows))
    ax.bar(xs, maxes, alpha=0.35, lw=1, color="c", label="max over steps")
    ax.bar(xs, means, alpha=0.8, lw=1, color="b", label="mean over steps")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=8)
    if any(v > 0 for v in maxes):
        ax.set_yscale("log")
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient flow")
    ax.legend()
    losses = list(run.loss) if run is not None else []
    lx.plot(range(1, len(losses) + 1), [v if math.isfinite(v) else float("nan") for v in losses])
    shown = finite(losses)
    if shown and min(shown) > 0 and max(shown) / min(shown) > 100:
        lx.set_yscale("log")
    lx.set_xlabel("step")
    lx.set_ylabel("loss")
    lx.set_title("Loss")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
