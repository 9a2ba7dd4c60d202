"""What the commands share: option sets, parsing that must not import torch, writing the
report and the exit code. Every command module imports these from here (and nothing from another
command)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from netdoctor.errors import UserError

if TYPE_CHECKING:
    from netdoctor.check import CheckOptions
    from netdoctor.config import Config
    from netdoctor.findings import Report

F = TypeVar("F", bound=Callable[..., Any])  # a click command function

FORMATS = ["text", "json", "sarif", "github", "html"]
FAIL_ON = ["error", "warning", "info", "never"]


def parse_shape(value: str | list | tuple | None) -> tuple[int, ...] | None:
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


def emit(text: str, output: str | None) -> None:
    if output:
        write_file(text, output)
    else:
        click.echo(text, nl=False)


def write_reports(
    reports: list[Report], fmt: str, output: str | None, color: bool | None, html: str | None
) -> None:
    """The report in `fmt` to `output` (or stdout), and with --html the html page as well."""
    from netdoctor.report import render

    emit(render(reports, fmt, color=False if output else color), output)
    if html:
        write_file(render(reports, "html"), html)


def write_file(text: str, path: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def require_html(fmt: str | None, html: str | None) -> None:
    """An html report's charts need plotly (the `html` extra): checked before any training."""
    if fmt == "html" or html:
        from netdoctor.report.charts import require_plotly

        require_plotly()


def exit_code(reports: list[Report], fail_on: str) -> int:
    from netdoctor.findings import Severity

    if fail_on == "never":
        return 0
    threshold = Severity.parse(fail_on)
    return 1 if any(f.severity >= threshold for r in reports for f in r.findings) else 0


def split_ids(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def report_options(fn: F) -> F:
    """The options every command that writes a report takes: format, output, --html, exit code
    and rule selection, config file, color."""
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="Report format."),
        click.option("-o", "--output", metavar="FILE", help="Write the report to FILE."),
        click.option(
            "--html",
            "html",
            metavar="FILE",
            help="Also write the report as a self-contained html page, with charts for "
            "probe and run (needs plotly: pip install 'netdoctor[html]').",
        ),
        click.option(
            "--fail-on",
            type=click.Choice(FAIL_ON),
            help="Exit 1 when a finding at or above this severity exists (default: error).",
        ),
        click.option(
            "--select",
            multiple=True,
            metavar="IDS",
            help="Only these rules (IDs or prefixes, comma separated).",
        ),
        click.option(
            "--ignore",
            "ignore_",
            multiple=True,
            metavar="IDS",
            help="Skip these rules (IDs or prefixes, comma separated).",
        ),
        click.option(
            "--config", metavar="FILE", help="pyproject.toml to read [tool.netdoctor] from."
        ),
        click.option("--color/--no-color", default=None, help="Force colored text output."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def common_options(fn: F) -> F:
    """Model options (constructor arguments, input shape, the seed netdoctor builds and runs
    the model under) plus the report options. Not for `run`: the user's script seeds itself."""
    options = [
        click.option(
            "-a",
            "--arg",
            "args",
            multiple=True,
            metavar="KEY=VALUE",
            help="Constructor argument (repeatable; values are Python literals).",
        ),
        click.option(
            "--kwargs",
            "kwargs_json",
            metavar="JSON",
            help="Constructor arguments as a JSON object.",
        ),
        click.option(
            "--input-shape", metavar="C,H,W", help="Input shape without the batch dimension."
        ),
        click.option(
            "--input-dtype",
            type=click.Choice(["float32", "float64", "float16", "bfloat16", "long"]),
            help="Input dtype (long for token ids).",
        ),
        click.option(
            "--seed",
            metavar="N",
            help="Seed for everything random: the model's construction, forward passes "
            "and the probe's data order and dropout (default 0), so the same "
            "command gives the same report.",
        ),
    ]
    fn = report_options(fn)
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def download_options(fn: F) -> F:
    """--data-mirror and --no-download, shared by every command that opens --data."""
    fn = click.option(
        "--no-download",
        is_flag=True,
        default=None,
        help="Built-in sets: never download; fail when the files are not in the data folder.",
    )(fn)
    fn = click.option(
        "--data-mirror",
        metavar="URL",
        help="Built-in sets: download missing files from URL, a folder serving "
        "the four standard .gz files (default: $NETDOCTOR_DATA_MIRROR, else "
        "the public mirrors; the published MD5 checksums apply).",
    )(fn)
    return fn


def options_from(
    config: Config,
    args: tuple[str, ...],
    kwargs_json: str | None,
    input_shape: str | None,
    input_dtype: str | None,
    select: tuple[str, ...],
    ignore_: tuple[str, ...],
    seed: str | None = None,
) -> CheckOptions:
    """CheckOptions from the shared options; the command line overrides [tool.netdoctor]."""
    from netdoctor.check import CheckOptions
    from netdoctor.loading.seeding import parse_seed
    from netdoctor.loading.target import parse_kwargs
    from netdoctor.rules.engine import RuleSettings

    return CheckOptions(
        kwargs=parse_kwargs(args, kwargs_json),
        input_shape=parse_shape(input_shape or config.input_shape),
        input_dtype=input_dtype or config.input_dtype or "float32",
        rules=RuleSettings.from_tables(
            split_ids(select) or config.select, split_ids(ignore_) + config.ignore, config.rules
        ),
        seed=config.seed if seed is None else parse_seed(seed),
    )
