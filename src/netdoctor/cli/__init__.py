"""The `netdoctor` command line: the group, its error handling, and the commands, one module
each. Heavy imports (torch) happen inside the commands that need them, so `--help`, `rules` and
`explain` stay fast."""

from __future__ import annotations

from typing import Any

import click

from netdoctor.cli.catalogue import explain, rules
from netdoctor.cli.check import check
from netdoctor.cli.probe import probe
from netdoctor.cli.run import run
from netdoctor.errors import UserError
from netdoctor.version import __version__


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
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
            click.echo(
                f"netdoctor: internal error: {type(e).__name__}: {e} "
                "(run with --debug for the traceback)",
                err=True,
            )
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
      netdoctor run train.py [ARGS...]                     watch your own training script
      netdoctor rules                                      the rule catalogue
      netdoctor explain ND101                              one rule's documentation
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for command in (check, probe, run, rules, explain):
    main.add_command(command)
