"""`netdoctor check`: static checks, optionally with a data sample; --diff and --fix;
--add-ignore and --statistics for adopting the gate on an existing codebase."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from netdoctor.cli.options import (
    common_options,
    download_options,
    emit,
    exit_code,
    options_from,
    write_file,
    write_reports,
)
from netdoctor.errors import UserError

if TYPE_CHECKING:
    from netdoctor.check import CheckOptions
    from netdoctor.data.sample import DataSample
    from netdoctor.findings import Report


@click.command()
@click.argument("targets", nargs=-1)
@common_options
@click.option(
    "--diff",
    "show_diff",
    is_flag=True,
    help="Print every fix as a patch (one per file; `git apply` takes it).",
)
@click.option(
    "--fix",
    "apply_fixes",
    is_flag=True,
    help="Apply the safe fixes to the files in place, then report what is left.",
)
@click.option(
    "--unsafe-fixes",
    is_flag=True,
    help="With --fix (implied): also apply fixes that change the model's behaviour "
    "beyond the fix (e.g. dropping a final softmax).",
)
@click.option(
    "--add-ignore",
    is_flag=True,
    help="Accept today's findings: write '# netdoctor: ignore[NDxxx]' on the lines "
    "that built the flagged layers (merged with existing ones) and exit 0, so "
    "the gate fails only on new problems.",
)
@click.option(
    "--statistics",
    is_flag=True,
    help="Print one line per rule with its number of findings instead of the report.",
)
@click.option(
    "--data",
    "data_source",
    metavar="SOURCE",
    help="Also check a data sample (ND3xx): fashionmnist, mnist, synthetic, FILE.npz "
    "or path.py:loader_fn.",
)
@click.option(
    "--data-dir",
    metavar="DIR",
    help="Folder holding FashionMNIST/raw, MNIST/raw "
    "(default: $NETDOCTOR_DATA_DIR, else ~/.cache/netdoctor/data).",
)
@download_options
@click.option("--resize", type=int, metavar="N", help="Resize images to NxN.")
@click.option("--raw", is_flag=True, help="Built-in sets: serve the stored 0..255 values.")
@click.option("--normalize", is_flag=True, help="Built-in sets: per-channel mean/std normalize.")
@click.option(
    "--batch-size", type=int, default=64, show_default=True, help="Samples per batch for --data."
)
def check(
    targets,
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
    show_diff,
    apply_fixes,
    unsafe_fixes,
    add_ignore,
    statistics,
    data_source,
    data_dir,
    no_download,
    data_mirror,
    resize,
    raw,
    normalize,
    batch_size,
):
    """Static checks of TARGET: file.py:Name, dotted.module:Name, model.onnx, or files/folders.

    With --data SOURCE, a sample of the data is checked against each model as well.
    --diff shows the fixes as a patch; --fix writes the safe ones into your files.
    --add-ignore accepts today's findings (ignore comments); --statistics counts them per rule.

    \b
      netdoctor check model.py:Net --input-shape 3,224,224
      netdoctor check models/ --format sarif -o netdoctor.sarif
      netdoctor check models/ --statistics
      netdoctor check models/ --add-ignore
    """
    from netdoctor.check import check as run_check
    from netdoctor.config import load_config

    cfg = load_config(config)
    targets = list(targets) or cfg.targets
    if not targets:
        raise UserError(
            "no target given: netdoctor check path/to/model.py:ClassName "
            "(or set targets in [tool.netdoctor])"
        )
    opts = options_from(cfg, args, kwargs_json, input_shape, input_dtype, select, ignore_, seed)
    apply_fixes = apply_fixes or unsafe_fixes
    if show_diff and apply_fixes:
        raise UserError("--diff shows the fixes and --fix applies them: use one of the two")
    _refuse_combinations(add_ignore, statistics, show_diff, apply_fixes, fmt or cfg.format)
    if add_ignore and html:
        raise UserError("--add-ignore accepts today's findings and writes no report: drop --html")
    data = (
        _data_sample(
            opts,
            data_source,
            data_dir,
            resize,
            raw,
            normalize,
            batch_size,
            download=not no_download,
            mirror=data_mirror,
        )
        if data_source
        else None
    )
    notes: list[str] = []

    def check_all() -> list[Report]:
        reports: list[Report] = []
        notes.clear()
        for target in targets:
            r, n = run_check(target, opts, data)
            reports.extend(r)
            notes.extend(n)
        return reports

    with _imports_frozen():
        if apply_fixes:
            reports = _fix(check_all, targets, unsafe_fixes)
        else:
            reports = check_all()
    if not reports and not notes:
        raise UserError("nothing to check")
    if add_ignore:
        _add_ignore(reports, targets)
        sys.exit(0)
    if notes:
        from netdoctor.findings import Report

        if reports:
            reports[0].notes.extend(notes)
        else:
            reports.append(Report(target=", ".join(targets), notes=notes))
    if show_diff or statistics:
        if show_diff:
            emit(_diff_text(reports), output)
        else:
            from netdoctor.report.statistics import render as render_statistics

            emit(render_statistics(reports, fmt or cfg.format or "text"), output)
        if html:
            from netdoctor.report import render

            write_file(render(reports, "html"), html)
    else:
        write_reports(reports, fmt or cfg.format or "text", output, color, html)
    sys.exit(exit_code(reports, fail_on or cfg.fail_on))


@contextlib.contextmanager
def _imports_frozen() -> Iterator[None]:
    """torch's import leaves some hundred thousand objects that live as long as the process, and
    every full pass of Python's cyclic garbage collector walks them all (a tenth of a second on
    a small machine, several times in a check). Frozen (gc.freeze), the passes walk only what
    the check itself creates; unfrozen afterwards, for a caller that lives on."""
    import gc

    import torch  # noqa: F401  (imported before the freeze)

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _data_sample(
    opts: CheckOptions,
    source: str,
    data_dir: str | None,
    resize: int | None,
    raw: bool,
    normalize: bool,
    batch_size: int,
    download: bool = True,
    mirror: str | None = None,
) -> DataSample:
    """Open `--data` once and draw the sample every model's data rules read. Without an input
    shape, the static checks use the data's (a note says so)."""
    from netdoctor.data import DataSpec, open_source
    from netdoctor.data.sample import DataSample

    spec = DataSpec(
        source,
        data_dir=Path(data_dir) if data_dir else None,
        batch_size=batch_size,
        resize=resize,
        raw=raw,
        normalize=normalize,
        download=download,
        mirror=mirror,
        input_shape=opts.input_shape,
        input_dtype=opts.input_dtype,
    )
    sample = DataSample.from_source(open_source(spec), spec=spec)
    if opts.input_shape is None and sample.x.dim() >= 2:
        opts.input_shape = tuple(sample.x.shape[1:])
        if str(sample.x.dtype) in ("torch.int64", "torch.int32"):
            opts.input_dtype = "long"  # token ids
        sample.notes.append(
            "input shape " + ",".join(map(str, opts.input_shape)) + " taken from the data"
        )
    return sample


def _diff_text(reports: list[Report]) -> str:
    """All diff fixes, merged into one patch per file; fixes that collide with a higher-priority
    one are left out (stderr says which: re-run after applying)."""
    from netdoctor.fixes.apply import plan_diff, plan_fixes

    patches = []
    for plan in plan_fixes(reports, unsafe=True):
        patches.append(plan_diff(plan))
        for f in plan.skipped:
            click.echo(
                f"netdoctor: {f.rule} fix for {f.module or plan.path} left out of the diff: "
                "it overlaps another fix (apply the diff, then run --diff again)",
                err=True,
            )
    return "".join(patches)


def _refuse_combinations(
    add_ignore: bool, statistics: bool, show_diff: bool, apply_fixes: bool, fmt: str | None
) -> None:
    if add_ignore:
        for flag, used in (
            ("--fix", apply_fixes),
            ("--diff", show_diff),
            ("--statistics", statistics),
        ):
            if used:
                raise UserError(
                    f"--add-ignore accepts today's findings and {flag} "
                    f"{'counts' if flag == '--statistics' else 'fixes'} them: "
                    "use one of the two"
                )
    if statistics and show_diff:
        raise UserError(
            "--statistics counts the findings and --diff shows their fixes: use one of the two"
        )
    if statistics and fmt not in (None, "text", "json"):
        raise UserError(f"--statistics prints text or json, not {fmt}")


def _project_roots(targets: list[str]) -> list[Path]:
    """Where --fix and --add-ignore may write: the cwd and the targets' folders (never an
    installed package or a virtual environment, see fixes.apply.writable)."""
    from netdoctor.loading.target import split_target

    roots = [Path.cwd().resolve()]
    for target in targets:
        path = Path(split_target(target)[0])
        if path.exists():
            roots.append((path if path.is_dir() else path.parent).resolve())
    return roots


def _add_ignore(reports: list[Report], targets: list[str]) -> None:
    """`check --add-ignore`: write the comments, say on stderr how many and what could not be
    suppressed (stdout stays empty)."""
    from netdoctor.fixes.ignores import add_ignores
    from netdoctor.loading.target import display_path

    outcome = add_ignores(reports, _project_roots(targets))
    for f, reason in outcome.left:
        where = (
            f" at {display_path(f.location.path)}:{f.location.line}"
            if f.location and f.location.line
            else f" ({f.module})"
            if f.module
            else ""
        )
        click.echo(
            f"netdoctor: {f.rule}{where} not suppressible: {reason} (use --ignore "
            f"{f.rule} or ignore it in [tool.netdoctor])",
            err=True,
        )
    n, m = outcome.comments, len(outcome.files)
    click.echo(
        f"added {n} ignore comment{'s' if n != 1 else ''} to {m} file{'s' if m != 1 else ''}",
        err=True,
    )


def _fix(check_all: Callable[[], list[Report]], targets: list[str], unsafe: bool) -> list[Report]:
    """`check --fix`: apply, re-check, and say on stderr what changed (stdout keeps the report,
    so --format json stays parseable)."""
    from netdoctor.fixes.apply import fix_until_clean, fixable
    from netdoctor.loading.target import display_path

    outcome = fix_until_clean(check_all, unsafe, _project_roots(targets))
    for path, f in sorted(
        outcome.applied, key=lambda a: (a[0], a[1].location.line if a[1].location else 0, a[1].rule)
    ):
        where = f" ({f.module})" if f.module else ""
        assert f.fix is not None  # an applied finding had a fix
        click.echo(
            f"fixed {display_path(path)}: {f.rule} {f.name}{where}: {f.fix.summary}", err=True
        )
    for message in outcome.messages:
        click.echo(f"netdoctor: {message}", err=True)
    left = [f for r in outcome.reports for f in r.findings]
    unsafe_left = sum(
        1
        for f in left
        if not unsafe and fixable(f, unsafe=True) and f.fix is not None and not f.fix.safe
    )
    line = (
        f"{len(outcome.applied)} fix{'es' if len(outcome.applied) != 1 else ''} applied to "
        f"{len(outcome.files)} file{'s' if len(outcome.files) != 1 else ''}, "
        f"{len(left)} finding{'s' if len(left) != 1 else ''} left"
    )
    if unsafe_left:
        line += f" ({unsafe_left} more fixable with --unsafe-fixes)"
    click.echo(line, err=True)
    return outcome.reports
