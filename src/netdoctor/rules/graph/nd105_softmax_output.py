"""ND105 softmax-output: the model returns softmax/log-softmax, which CrossEntropyLoss applies
again (doc: rules/ND105.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import diff_fix, remove_arg, unwrap_call
from netdoctor.graph.ir import WEIGHT_OPS, Node
from netdoctor.graph.walks import call_site, module_attr, op_label, output_producers
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext

# Ops that leave "this is the model output" unchanged.
_OUTPUT_PASS = {"reshape", "identity", "getitem", "split"}
# ... and, between the final layer and an activation on it, ops that keep it the same logits.
LOGIT_PASS = _OUTPUT_PASS | {"dropout", "avgpool", "maxpool", "pad", "upsample", "mean"}
_FUNCTION_NAMES = {
    "softmax": ("softmax",),
    "log_softmax": ("log_softmax",),
    "relu": ("relu", "relu_"),
    "relu6": ("relu6",),
    "elu": ("elu", "elu_"),
    "selu": ("selu",),
    "softplus": ("softplus",),
}
_MODULE_TYPES = {
    "softmax": ("Softmax", "Softmax2d"),
    "log_softmax": ("LogSoftmax",),
    "relu": ("ReLU",),
    "relu6": ("ReLU6",),
    "elu": ("ELU",),
    "selu": ("SELU",),
    "softplus": ("Softplus",),
}


def remove_op_fix(node: Node, summary: str, snippet: str, safe: bool = False) -> Fix:
    """A diff that takes an op out of the model: drop the nn.Module from its nn.Sequential, or
    replace its call in forward (`F.softmax(x, dim=1)`, `self.act(x)`) by its argument."""
    types = _MODULE_TYPES.get(node.op, (node.attrs.get("type", ""),))
    # (a location without a line is an ONNX node's: its file is not edited)
    location = node.location
    if node.module and location is not None:
        path, line = location.path, location.line or 0

        def edit(src: str) -> str | None:
            new = remove_arg(src, line, types)
            if new is not None:
                return new
            attr, site = module_attr(node), call_site(node)
            if attr and site is not None and site.path == path:
                return unwrap_call(src, site.line or 0, (attr,))
            return None

        fix = diff_fix(summary, path, edit, snippet, safe=safe)
        if fix.kind == "diff":
            return fix
        site, attr = call_site(node), module_attr(node)
        if site is not None and attr and site.path != path:
            call_line = site.line or 0
            return diff_fix(
                summary,
                site.path,
                lambda src: unwrap_call(src, call_line, (attr,)),
                snippet,
                safe=safe,
            )
        return fix
    site = call_site(node)
    if site is not None:
        names = _FUNCTION_NAMES.get(node.op, (node.op,))
        call_line = site.line or 0
        return diff_fix(
            summary, site.path, lambda src: unwrap_call(src, call_line, names), snippet, safe=safe
        )
    return Fix(summary, snippet, "snippet", safe=safe)


def _where(node: Node) -> str:
    return op_label(node)


def _classes(node) -> int | None:
    shape = node.shape
    if shape and len(shape) >= 2 and shape[-1] > 1:
        return int(shape[-1]) if len(shape) == 2 else None
    return None


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    producers = output_producers(graph, _OUTPUT_PASS)
    heads = [p for p in producers if p.op in ("softmax", "log_softmax")]
    if not heads or len(heads) != len(producers):
        return  # nothing, or softmax returned next to raw logits (a deliberate extra output)
    for node in heads:
        kind = "log-softmax" if node.op == "log_softmax" else "softmax"
        classes = _classes(node)
        if node.op == "softmax":
            cap = ""
            if classes:
                best = math.e / (math.e + classes - 1)
                floor = math.log(1 + (classes - 1) / math.e)
                cap = (
                    f" With {classes} classes the loss can never go below {floor:.2f} "
                    f"(chance is ln({classes}) = {math.log(classes):.2f}) and no prediction "
                    f"can be more than {best:.0%} confident, however long it trains;"
                )
            message = (
                f"the model returns the output of a softmax ({_where(node)}). "
                "nn.CrossEntropyLoss expects raw logits and applies log-softmax itself, "
                "so training on these outputs applies softmax twice: the outputs are "
                "squeezed into [0, 1] before the loss sees them."
                + cap
                + " gradients are damped by the extra softmax's Jacobian. Return the logits "
                "and apply softmax only when you need probabilities (inference)."
            )
        else:
            message = (
                f"the model returns the output of a log-softmax ({_where(node)}). That is "
                "right for nn.NLLLoss, but nn.CrossEntropyLoss applies log-softmax again "
                "(harmless, since log-softmax is idempotent, but the pairing is a common "
                "source of confusion: returning logits works with CrossEntropyLoss and "
                "with F.log_softmax + NLLLoss at the call site)."
            )
        summary = (
            f"return the logits: remove the final {kind} (nn.CrossEntropyLoss applies "
            "log-softmax itself; call softmax at inference time)"
        )
        snippet = (
            f"return logits  # instead of {node.op}(logits, dim=...); "
            "probabilities = logits.softmax(dim=1) at inference"
        )
        feeding = [
            n
            for n in graph.upstream(node.name, through=LOGIT_PASS)
            if n.op in WEIGHT_OPS and n.module
        ]
        yield RULE.finding(
            message,
            module=node.module or (feeding[0].module if feeding else None),
            location=node.location if node.module else call_site(node),
            fix=remove_op_fix(node, summary, snippet, safe=False),
            evidence={"op": node.op, "classes": classes, "dim": node.attrs.get("dim")},
            impact=6.0 if node.op == "softmax" else 0.5,
            # correct with NLLLoss, idempotent under CE
            severity=Severity.INFO if node.op == "log_softmax" else None,
        )


def remove_output_activation(finding: Finding, context: RemedyContext) -> Remedy | None:
    """The output activation module replaced by nn.Identity in a copy of the model (ND105 and
    ND106); a functional softmax/relu in forward needs a code change."""
    from netdoctor.fixes.memory import identity, is_activation_module

    module = finding.module
    if module is None or not is_activation_module(context.model, module):
        return None  # a functional softmax/relu in forward: a code change
    return Remedy(
        finding.rule,
        f"{module} removed from the output",
        "model",
        model_fn=identity([module]),
    )


RULE = Rule(
    "ND105",
    "softmax-output",
    Severity.WARNING,
    Stage.GRAPH,
    summary="the model returns softmax/log-softmax (CrossEntropyLoss applies it again)",
    check=check,
    options=NoOptions,
    remedy=remove_output_activation,
    fixture=Fixture("check", ("fixtures/sick/softmax_output.py:SoftmaxNet",)),
    healthy=Fixture("check", ("fixtures/healthy/autoencoder.py:AutoEncoder",)),
)
