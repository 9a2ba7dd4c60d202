"""ND104 unregistered-submodule: modules held in a plain list/dict/tuple instead of
ModuleList/ModuleDict (doc: rules/ND104.md)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from netdoctor.findings import Finding, Fix, Location, Severity
from netdoctor.fixes.patch import attribute_line, diff_fix, nn_prefix, read, wrap_attribute
from netdoctor.graph.ir import UnregisteredHolder
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext


def what_is_lost(holder: UnregisteredHolder) -> str:
    """The message's account of what the plain container hides from the parent module."""
    owner = holder.owner_class or "the model"
    held = (
        f"{owner}.{holder.attr} is a plain {holder.container} holding "
        f"{holder.count} module(s) ({', '.join(holder.module_types)})"
    )
    if holder.parameters != 0:  # parameters, or not measured: everything is lost
        return (
            f"{held}: they are invisible to .parameters(), .to(device), .train()/.eval() and "
            "state_dict, so the optimizer never updates them and they never move to the GPU."
        )
    lost = []
    if holder.buffers:
        lost.append(
            f"their {holder.buffers} buffer(s) are missing from .to(device) and state_dict, so "
            "they never move to the GPU and are never saved or loaded"
        )
    if holder.mode_dependent:
        types = holder.mode_dependent
        they = "it stays" if len(types) == 1 else "they stay"
        lost.append(
            f"the parent's .train()/.eval() never reaches {', '.join(types)}, whose behaviour "
            f"depends on the mode: after model.eval() {they}"
            " in training mode, so evaluation and inference still run the training-time behaviour "
            "(dropout, batch statistics)"
        )
    return f"{held} without parameters, but not without loss: {'; '.join(lost)}."


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    for holder in graph.unregistered:
        if holder.stateless:
            continue  # activations, kernels: no state, no mode, nothing the parent misses
        wrapper = "ModuleDict" if holder.container == "dict" else "ModuleList"
        message = what_is_lost(holder)
        summary = f"wrap it in nn.{wrapper}: self.{holder.attr} = nn.{wrapper}(...)"
        path = holder.location or holder.owner_location
        empty = "{...}" if wrapper == "ModuleDict" else "[...]"
        snippet = f"self.{holder.attr} = nn.{wrapper}({empty})"
        fix = Fix(summary, snippet, "snippet")
        if path is not None:
            edit = partial(
                wrap_attribute,
                attr=holder.attr,
                wrapper=nn_prefix(read(path.path) or "") + wrapper,
                near_line=holder.location.line if holder.location else None,
            )
            fix = diff_fix(summary, path.path, edit, snippet)
        module = f"{holder.owner}.{holder.attr}" if holder.owner else holder.attr
        location = holder.location
        if location is not None and location.line:  # point at `self.layers = [`
            source = read(location.path)
            line = attribute_line(source, holder.attr, location.line) if source else None
            location = Location(location.path, line) if line else location
        yield RULE.finding(
            message,
            module=module,
            location=location,
            fix=fix,
            evidence={
                "container": holder.container,
                "count": holder.count,
                "types": holder.module_types,
            },
            impact=10.0,
        )


RULE = Rule(
    "ND104",
    "unregistered-submodule",
    Severity.ERROR,
    Stage.GRAPH,
    summary="modules held in a plain list/dict/tuple instead of ModuleList/ModuleDict",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/list_layers.py:ListMLP",)),
    healthy=Fixture("check", ("fixtures/healthy/kernel_registry.py:KernelRegistryMLP",)),
)
