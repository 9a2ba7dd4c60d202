"""`netdoctor rules` and `netdoctor explain`: the catalogue and one rule's doc (no torch)."""

from __future__ import annotations

import click

from netdoctor.errors import UserError


@click.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def rules(fmt: str) -> None:
    """List the rule catalogue."""
    from netdoctor.catalogue import RULES

    if fmt == "json":
        import json

        click.echo(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "name": r.name,
                        "severity": r.severity.label,
                        "stage": r.stage,
                        "summary": r.summary,
                    }
                    for r in RULES.values()
                ],
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("id", "name", "severity", "stage", "finds"):
        table.add_column(col)
    for r in RULES.values():
        table.add_row(r.id, r.name, r.severity.label, r.stage, r.summary)
    Console(width=140).print(table)


@click.command()
@click.argument("rule")
def explain(rule: str) -> None:
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
