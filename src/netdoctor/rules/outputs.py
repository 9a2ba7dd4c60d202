"""ND105, ND106: what the model's output is made of (softmax heads, clamped logits)."""

from __future__ import annotations

import math

from netdoctor.findings import Fix, Severity
from netdoctor.fixes.patch import diff_fix, remove_arg, unwrap_call
from netdoctor.graph.ir import WEIGHT_OPS, Graph
from netdoctor.rules._paths import call_site, module_attr, op_label, output_producers
from netdoctor.rules.registry import Context, rule

# Ops that leave "this is the model output" unchanged.
_OUTPUT_PASS = {"reshape", "identity", "getitem", "split"}
# ... and, between the final layer and an activation on it, ops that keep it the same logits.
_LOGIT_PASS = _OUTPUT_PASS | {"dropout", "avgpool", "maxpool", "pad", "upsample", "mean"}
_CLAMPING = {"relu", "relu6", "elu", "selu", "softplus"}
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


def remove_op_fix(node, summary: str, snippet: str, safe: bool = False) -> Fix:
    """A diff that takes an op out of the model: drop the nn.Module from its nn.Sequential, or
    replace its call in forward (`F.softmax(x, dim=1)`, `self.act(x)`) by its argument."""
    types = _MODULE_TYPES.get(node.op, (node.attrs.get("type", ""),))
    if node.module and node.location is not None:
        line = node.location.line

        def edit(src: str) -> str | None:
            new = remove_arg(src, line, types)
            if new is not None:
                return new
            attr, site = module_attr(node), call_site(node)
            if attr and site is not None and site.path == node.location.path:
                return unwrap_call(src, site.line, (attr,))
            return None

        fix = diff_fix(summary, node.location.path, edit, snippet, safe=safe)
        if fix.kind == "diff":
            return fix
        site, attr = call_site(node), module_attr(node)
        if site is not None and attr and site.path != node.location.path:
            return diff_fix(
                summary,
                site.path,
                lambda src: unwrap_call(src, site.line, (attr,)),
                snippet,
                safe=safe,
            )
        return fix
    site = call_site(node)
    if site is not None:
        names = _FUNCTION_NAMES.get(node.op, (node.op,))
        return diff_fix(
            summary, site.path, lambda src: unwrap_call(src, site.line, names), snippet, safe=safe
        )
    return Fix(summary, snippet, "snippet", safe=safe)


def _where(node) -> str:
    return op_label(node)


def _classes(node) -> int | None:
    shape = node.shape
    if shape and len(shape) >= 2 and shape[-1] > 1:
        return int(shape[-1]) if len(shape) == 2 else None
    return None


# -- ND105 softmax-output ------------------------------------------------------------------------


@rule("ND105")
def softmax_output(ctx: Context):
    graph: Graph = ctx.graph
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
            for n in graph.upstream(node.name, through=_LOGIT_PASS)
            if n.op in WEIGHT_OPS and n.module
        ]
        finding = ctx.finding(
            "ND105",
            message,
            module=node.module or (feeding[0].module if feeding else None),
            location=node.location if node.module else call_site(node),
            fix=remove_op_fix(node, summary, snippet, safe=False),
            evidence={"op": node.op, "classes": classes, "dim": node.attrs.get("dim")},
            impact=6.0 if node.op == "softmax" else 0.5,
        )
        if node.op == "log_softmax" and "severity" not in ctx.options.get("ND105", {}):
            finding.severity = Severity.INFO  # correct with NLLLoss, idempotent under CE
        yield finding


# -- ND106 activation-on-logits ------------------------------------------------------------------

_CLAMP_WHY = {
    "relu": "a ReLU clamps every logit at 0 from below and passes no gradient where a logit is "
    "negative: a class whose logit goes negative for an input gets no gradient to "
    "recover, and the model cannot express 'surely not this class'",
    "relu6": "a ReLU6 clamps logits to [0, 6] and passes no gradient outside that range",
    "elu": "an ELU bounds logits below by -1 and saturates there (vanishing gradient)",
    "selu": "a SELU bounds logits below by -1.76 and saturates there (vanishing gradient)",
    "softplus": "a Softplus keeps logits positive and flattens (vanishing gradient) for "
    "negative pre-activations",
}


@rule("ND106")
def activation_on_logits(ctx: Context):
    graph: Graph = ctx.graph
    producers = output_producers(graph, _LOGIT_PASS)
    if not producers or any(p.op not in _CLAMPING for p in producers):
        return  # mixed outputs (e.g. mean and softplus(std) heads) are deliberate
    for act in producers:
        layers = [
            n
            for n in graph.upstream(act.name, through=_LOGIT_PASS)
            if n.op != "param" and n.op != "size"
        ]
        if not layers or any(n.op not in WEIGHT_OPS for n in layers):
            continue
        layer = layers[0]
        message = (
            f"{op_label(act)} is applied to the output of "
            f"the final layer {layer.label}: {_CLAMP_WHY[act.op]}. Cross-entropy wants "
            "unbounded logits; end the model with the weight layer."
        )
        summary = f"remove the {act.attrs.get('type', act.op)} after the final layer {layer.label}"

        snippet = (
            "# end forward with the final layer: return the logits unclamped\n"
            f"return logits  # not {act.op}(logits)"
        )
        yield ctx.finding(
            "ND106",
            message,
            module=act.module or layer.module,
            location=act.location if act.module else call_site(act),
            fix=remove_op_fix(act, summary, snippet, safe=False),
            evidence={"activation": act.op, "final_layer": layer.label},
            impact=4.0,
        )
