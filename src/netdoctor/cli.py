"""The `netdoctor` command line. Heavy imports (torch) happen inside commands that need them,
so `--help`, `rules` and `explain` stay fast."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from netdoctor import __version__
from netdoctor.errors import UserError

FORMATS = ["text", "json", "sarif", "github"]
FAIL_ON = ["error", "warning", "info", "never"]


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"netdoctor: error: {e}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("netdoctor: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug in netdoctor: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"netdoctor: internal error: {type(e).__name__}: {e} "
                       "(run with --debug for the traceback)", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="netdoctor")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """A doctor for PyTorch models: finds why a network does not train, and shows the fix.

    \b
      netdoctor check model.py:Net --input-shape 1,28,28   static checks
      netdoctor probe model.py:Net --data fashionmnist     short instrumented training run
      netdoctor rules                                      the rule catalogue
      netdoctor explain ND101                              one rule's documentation
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _shape(value: str | list | tuple | None) -> tuple[int, ...] | None:
    """'1,28,28', '1x28x28' or [1, 28, 28] -> (1, 28, 28); parsed before torch is imported,
    so a typo fails fast."""
    if not value:
        return None
    text = value if isinstance(value, str) else ",".join(map(str, value))
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"input shape must be integers like 1,28,28, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"input shape must be positive integers like 1,28,28, got {text!r}")
    return shape


def _emit(text: str, output: str | None) -> None:
    if output:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {output}: {e.strerror}") from None
    else:
        click.echo(text, nl=False)


def _exit_code(reports, fail_on: str) -> int:
    from netdoctor.findings import Severity

    if fail_on == "never":
        return 0
    threshold = Severity.parse(fail_on)
    return 1 if any(f.severity >= threshold for r in reports for f in r.findings) else 0


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _common_options(fn):
    options = [
        click.option("-a", "--arg", "args", multiple=True, metavar="KEY=VALUE",
                     help="Constructor argument (repeatable; values are Python literals)."),
        click.option("--kwargs", "kwargs_json", metavar="JSON",
                     help="Constructor arguments as a JSON object."),
        click.option("--input-shape", metavar="C,H,W",
                     help="Input shape without the batch dimension."),
        click.option("--input-dtype", type=click.Choice(["float32", "float64", "float16",
                                                         "bfloat16", "long"]),
                     help="Input dtype (long for token ids)."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="Report format."),
        click.option("-o", "--output", metavar="FILE", help="Write the report to FILE."),
        click.option("--fail-on", type=click.Choice(FAIL_ON),
                     help="Exit 1 when a finding at or above this severity exists "
                          "(default: error)."),
        click.option("--select", multiple=True, metavar="IDS",
                     help="Only these rules (IDs or prefixes, comma separated)."),
        click.option("--ignore", "ignore_", multiple=True, metavar="IDS",
                     help="Skip these rules (IDs or prefixes, comma separated)."),
        click.option("--config", metavar="FILE",
                     help="pyproject.toml to read [tool.netdoctor] from."),
        click.option("--color/--no-color", default=None, help="Force colored text output."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _options_from(config, args, kwargs_json, input_shape, input_dtype, select, ignore_):
    from netdoctor.check import CheckOptions
    from netdoctor.loading.target import parse_kwargs

    return CheckOptions(
        kwargs=parse_kwargs(args, kwargs_json),
        input_shape=_shape(input_shape or config.input_shape),
        input_dtype=input_dtype or config.input_dtype or "float32",
        select=_split(select) or config.select,
        ignore=_split(ignore_) + config.ignore,
        rule_options=config.rules,
    )


@main.command()
@click.argument("targets", nargs=-1)
@_common_options
@click.option("--diff", "show_diff", is_flag=True,
              help="Print every fix as a patch (one per file; `git apply` takes it).")
@click.option("--fix", "apply_fixes", is_flag=True,
              help="Apply the safe fixes to the files in place, then report what is left.")
@click.option("--unsafe-fixes", is_flag=True,
              help="With --fix (implied): also apply fixes that change the model's behaviour "
                   "beyond the fix (e.g. dropping a final softmax).")
@click.option("--data", "data_source", metavar="SOURCE",
              help="Also check a data sample (ND3xx): fashionmnist, mnist, synthetic, FILE.npz "
                   "or path.py:loader_fn.")
@click.option("--data-dir", metavar="DIR", help="Folder holding FashionMNIST/raw, MNIST/raw.")
@click.option("--resize", type=int, metavar="N", help="Resize images to NxN.")
@click.option("--raw", is_flag=True, help="Built-in sets: serve the stored 0..255 values.")
@click.option("--normalize", is_flag=True, help="Built-in sets: per-channel mean/std normalize.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Samples per batch for --data.")
def check(targets, args, kwargs_json, input_shape, input_dtype, fmt, output, fail_on, select,
          ignore_, config, color, show_diff, apply_fixes, unsafe_fixes, data_source, data_dir,
          resize, raw, normalize, batch_size):
    """Static checks of TARGET: file.py:Name, dotted.module:Name, or files/folders.

    With --data SOURCE, a sample of the data is checked against each model as well.
    --diff shows the fixes as a patch; --fix writes the safe ones into your files."""
    from netdoctor.check import check as run_check
    from netdoctor.config import load_config
    from netdoctor.report import render

    cfg = load_config(config)
    targets = list(targets) or cfg.targets
    if not targets:
        raise UserError("no target given: netdoctor check path/to/model.py:ClassName "
                        "(or set targets in [tool.netdoctor])")
    opts = _options_from(cfg, args, kwargs_json, input_shape, input_dtype, select, ignore_)
    apply_fixes = apply_fixes or unsafe_fixes
    if show_diff and apply_fixes:
        raise UserError("--diff shows the fixes and --fix applies them: use one of the two")
    data = _data_sample(opts, data_source, data_dir, resize, raw, normalize, batch_size) \
        if data_source else None
    notes: list[str] = []

    def check_all():
        reports = []
        notes.clear()
        for target in targets:
            r, n = run_check(target, opts, data)
            reports.extend(r)
            notes.extend(n)
        return reports

    if apply_fixes:
        reports = _fix(check_all, targets, unsafe_fixes)
    else:
        reports = check_all()
    if not reports and not notes:
        raise UserError("nothing to check")
    if notes:
        from netdoctor.findings import Report

        if reports:
            reports[0].notes.extend(notes)
        else:
            reports.append(Report(target=", ".join(targets), notes=notes))
    if show_diff:
        _emit(_diff_text(reports), output)
    else:
        fmt = fmt or cfg.format or "text"
        _emit(render(reports, fmt, color=False if output else color), output)
    sys.exit(_exit_code(reports, fail_on or cfg.fail_on))


def _data_sample(opts, source, data_dir, resize, raw, normalize, batch_size):
    """Open `--data` once and draw the sample every model's data rules read. Without an input
    shape, the static checks use the data's (a note says so)."""
    from netdoctor.data import DataSpec, open_source
    from netdoctor.rules.data import DataSample

    spec = DataSpec(source, data_dir=Path(data_dir) if data_dir else None, batch_size=batch_size,
                    resize=resize, raw=raw, normalize=normalize,
                    input_shape=opts.input_shape, input_dtype=opts.input_dtype)
    sample = DataSample.from_source(open_source(spec), spec=spec)
    if opts.input_shape is None and sample.x.dim() >= 2:
        opts.input_shape = tuple(sample.x.shape[1:])
        if str(sample.x.dtype) in ("torch.int64", "torch.int32"):
            opts.input_dtype = "long"  # token ids
        sample.notes.append("input shape " + ",".join(map(str, opts.input_shape))
                            + " taken from the data")
    return sample


def _diff_text(reports) -> str:
    """All diff fixes, merged into one patch per file; fixes that collide with a higher-priority
    one are left out (stderr says which: re-run after applying)."""
    from netdoctor.fixes.apply import plan_diff, plan_fixes

    patches = []
    for plan in plan_fixes(reports, unsafe=True):
        patches.append(plan_diff(plan))
        for f in plan.skipped:
            click.echo(f"netdoctor: {f.rule} fix for {f.module or plan.path} left out of the diff: "
                       "it overlaps another fix (apply the diff, then run --diff again)", err=True)
    return "".join(patches)


def _fix(check_all, targets, unsafe: bool):
    """`check --fix`: apply, re-check, and say on stderr what changed (stdout keeps the report,
    so --format json stays parseable)."""
    from netdoctor.fixes.apply import fix_until_clean, fixable
    from netdoctor.loading.target import display_path, split_target

    roots = [Path.cwd().resolve()]
    for target in targets:
        path = Path(split_target(target)[0])
        if path.exists():
            roots.append((path if path.is_dir() else path.parent).resolve())
    outcome = fix_until_clean(check_all, unsafe, roots)
    for path, f in sorted(outcome.applied, key=lambda a: (a[0], a[1].location.line
                                                          if a[1].location else 0, a[1].rule)):
        where = f" ({f.module})" if f.module else ""
        click.echo(f"fixed {display_path(path)}: {f.rule} {f.name}{where}: {f.fix.summary}",
                   err=True)
    for message in outcome.messages:
        click.echo(f"netdoctor: {message}", err=True)
    left = [f for r in outcome.reports for f in r.findings]
    unsafe_left = sum(1 for f in left if not unsafe and fixable(f, unsafe=True)
                      and not f.fix.safe)
    line = (f"{len(outcome.applied)} fix{'es' if len(outcome.applied) != 1 else ''} applied to "
            f"{len(outcome.files)} file{'s' if len(outcome.files) != 1 else ''}, "
            f"{len(left)} finding{'s' if len(left) != 1 else ''} left")
    if unsafe_left:
        line += f" ({unsafe_left} more fixable with --unsafe-fixes)"
    click.echo(line, err=True)
    return outcome.reports


@main.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def rules(fmt):
    """List the rule catalogue."""
    from netdoctor.catalogue import RULES

    if fmt == "json":
        import json

        click.echo(json.dumps([{"id": r.id, "name": r.name, "severity": r.severity.label,
                                "stage": r.stage, "summary": r.summary}
                               for r in RULES.values()], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("id", "name", "severity", "stage", "finds"):
        table.add_column(col)
    for r in RULES.values():
        table.add_row(r.id, r.name, r.severity.label, r.stage, r.summary)
    Console(width=140).print(table)


@main.command()
@click.argument("rule")
def explain(rule):
    """Print a rule's documentation (e.g. netdoctor explain ND101)."""
    from netdoctor.catalogue import lookup
    from netdoctor.docs import read_doc

    try:
        info = lookup(rule)
    except KeyError:
        raise UserError(f"unknown rule {rule!r} (netdoctor rules lists them)") from None
    text = read_doc(info.id)
    if text is None:
        raise UserError(f"no documentation found for {info.id}")
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    if console.is_terminal:
        console.print(Markdown(text))
    else:
        click.echo(text)


from netdoctor.probe.command import probe  # noqa: E402

main.add_command(probe)
