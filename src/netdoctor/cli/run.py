"""`netdoctor run`: the user's own training script, run in this process with the doctor
watching; the report comes when the script ends. The work is
`netdoctor.watcher.script.run_script` (imported inside, with torch)."""

from __future__ import annotations

import sys

import click

from netdoctor.cli.options import report_options, require_html, split_ids, write_reports
from netdoctor.errors import UserError

RUN_KEYS = {"every", "stop-on", "dist-timeout", "tensorboard"}


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@report_options
@click.option(
    "--every",
    type=int,
    metavar="N",
    help="Measure every layer every N steps (after the first steps and log-spaced "
    "ones; default 50).",
)
@click.option(
    "--stop-on",
    type=click.Choice(["error", "warning", "never"]),
    help="Stop training at the first confirmed finding of this severity and write "
    "the report (default never: severe findings are only announced on stderr).",
)
@click.option(
    "--tensorboard",
    metavar="DIR",
    help="Also write the doctor's curves (loss, gradient norms, learning rate, per-layer "
    "values on the deep steps) and its findings as TensorBoard events to DIR (needs the "
    "tensorboard package).",
)
@click.argument(
    "argv", nargs=-1, type=click.UNPROCESSED, metavar="SCRIPT.py [ARGS]... | -m MODULE [ARGS]..."
)
def run(
    fmt, output, html, fail_on, select, ignore_, config, color, every, stop_on, tensorboard, argv
):
    """Run SCRIPT.py [ARGS...] (or -m MODULE [ARGS...]) as python would, with netdoctor
    watching every model and optimizer it trains; report when it ends.

    \b
      netdoctor run train.py --epochs 3
      netdoctor run --stop-on error -m mypkg.train --lr 0.1
      netdoctor run --format json -o report.json train.py
      netdoctor run --tensorboard runs/doctor train.py
      netdoctor run --html report.html train.py
      torchrun --nproc_per_node 4 -m netdoctor run train.py   (rank 0 reports)

    Options go before the script; everything after it is the script's. Exit code: the
    script's own when it failed, else 0/1 by --fail-on.
    """
    from netdoctor.config import load_config

    cfg = load_config(config)
    table = dict(cfg.run)
    unknown = sorted(set(table) - RUN_KEYS)
    if unknown:
        raise UserError(
            f"unknown key(s) in [tool.netdoctor.run]: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(RUN_KEYS))})"
        )
    argv = list(argv)
    module = None
    if argv and argv[0] == "-m":
        if len(argv) < 2:
            raise UserError("-m needs a module name: netdoctor run -m package.module [ARGS...]")
        module, args = argv[1], argv[2:]
        script = None
    elif argv and argv[0].startswith("-") and argv[0] != "-":
        raise UserError(
            f"unknown option {argv[0]} (netdoctor run's options go before the "
            "script; see netdoctor run --help)"
        )
    else:
        script, args = (argv[0], argv[1:]) if argv else (None, [])

    from netdoctor.watcher.settings import DEFAULT_DIST_TIMEOUT, DEFAULT_EVERY, WatchOptions

    opts = WatchOptions(
        every=every if every is not None else int(table.get("every", DEFAULT_EVERY)),
        select=split_ids(select) or cfg.select,
        ignore=split_ids(ignore_) + cfg.ignore,
        stop_on=stop_on or str(table.get("stop-on", "never")),
        fail_on=fail_on or cfg.fail_on,
        format=fmt or cfg.format or "text",
        rule_options=cfg.rules,
        dist_timeout=table.get("dist-timeout", DEFAULT_DIST_TIMEOUT),
        tensorboard=tensorboard or table.get("tensorboard"),
    )
    opts.validate()
    require_html(opts.format, html)
    if opts.tensorboard:
        _make_directory(str(opts.tensorboard))

    from netdoctor.watcher.script import resolve, run_script

    name, where = resolve(script, module)
    from netdoctor.loading.provenance import Provenance
    from netdoctor.watcher.doctor import Doctor

    provenance = Provenance()
    doctor = Doctor(opts, target=name, provenance=provenance)
    doctor.joinable = True
    outcome = run_script(where, args, module is not None, doctor, provenance)
    failed = (
        outcome.kind in ("exit", "exception", "interrupted", "terminated")
        and outcome.exit_code != 0
    )
    if doctor.rank != 0:  # under torchrun rank 0 writes the one report (with this rank's part)
        sys.exit(outcome.exit_code if failed else 0)
    if outcome.kind == "stopped" and doctor.stopped_by is not None:
        f = doctor.stopped_by
        click.echo(
            f"netdoctor: stopped training at step {doctor.facts.iterations} "
            f"(--stop-on {opts.stop_on}): {f.rule} {f.name}",
            err=True,
        )
    write_reports([doctor.diagnose()], opts.format, output, color, html)
    if failed:
        sys.exit(outcome.exit_code)
    sys.exit(doctor.exit_code(opts.fail_on))


def _make_directory(path: str) -> None:
    """--tensorboard's directory exists (made now: a path that cannot be written fails before
    the training starts)."""
    import os

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--tensorboard: cannot create {path}: {e.strerror or e}") from None
