"""ND107-ND111: local structure between layers (collapsing linear maps, detached forward passes,
cancelled biases, dropout before BatchNorm, repeated activations)."""

from __future__ import annotations

from collections import defaultdict

from netdoctor.findings import Fix
from netdoctor.fixes.patch import (
    diff_fix,
    insert_args_after,
    nn_prefix,
    read,
    set_keyword,
    torch_function_prefix,
    unwrap_attribute,
    unwrap_call,
    unwrap_with,
    wrap_call,
)
from netdoctor.graph.ir import WEIGHT_OPS, Graph, Node
from netdoctor.rules._paths import (
    call_site,
    data_consumers,
    data_inputs,
    is_constant,
    module_attr,
    op_label,
    source_line,
)
from netdoctor.rules.outputs import remove_op_fix
from netdoctor.rules.registry import Context, rule


def _is_depthwise(node: Node) -> bool:
    groups = node.attrs.get("groups") or 1
    return node.op == "conv" and groups > 1 and groups == node.attrs.get("in_channels")


def _dims(node: Node) -> tuple[int, int] | None:
    if node.op == "linear":
        dims = node.attrs.get("in_features"), node.attrs.get("out_features")
    else:
        dims = node.attrs.get("in_channels"), node.attrs.get("out_channels")
    return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def _is_bottleneck(first: Node, second: Node) -> bool:
    """A deliberate low-rank factorization: the first layer narrows (out < in) to a width the
    second widens again (an autoencoder's linear latent code, an SVD/LoRA-style factorization).
    A forgotten activation in a plain MLP (784 -> 256 -> 10) keeps narrowing: not a bottleneck."""
    a, b = _dims(first), _dims(second)
    return a is not None and b is not None and a[1] < a[0] and a[1] < b[1]


def _describe(node: Node) -> str:
    kind = node.attrs.get("type", node.op)
    if node.op == "linear" and node.attrs.get("in_features"):
        return f"{kind}({node.attrs['in_features']}, {node.attrs.get('out_features')})"
    if node.op == "conv" and node.attrs.get("in_channels"):
        return f"{kind}({node.attrs['in_channels']}, {node.attrs.get('out_channels')})"
    return kind


# -- ND107 linear-collapse ----------------------------------------------------------------------

# Ops that keep a map linear (or affine): reshaping, slicing, identity, dropout (a rescaled mask
# in training, the identity in eval), average pooling and other linear reductions, padding,
# interpolation. Add/sub/mul/div count only when the other operand is a constant or parameter.
_LINEAR_PASS = {
    "reshape",
    "identity",
    "dropout",
    "avgpool",
    "getitem",
    "split",
    "pad",
    "upsample",
    "mean",
    "sum",
    "neg",
}
_AFFINE_WITH_CONSTANT = {"add", "sub", "mul", "div"}


def collapsing_pairs(graph: Graph) -> list[tuple[Node, list[Node], Node]]:
    """(first layer, ops between, second layer) for every two weight layers joined only by
    linear ops, with no branching out of the first and no other data merging in."""
    memo: dict[str, bool] = {}
    pairs = []
    for first in graph.of_op(*WEIGHT_OPS):
        if first.attrs.get("type") == "Bilinear":
            continue
        cur, between = first, []
        while True:
            consumers = data_consumers(graph, cur.name, memo)
            if len(consumers) != 1:
                break  # the value branches (or is unused / is the output)
            nxt = consumers[0]
            others = [i for i in data_inputs(graph, nxt, memo) if i != cur.name]
            if others or nxt.inputs.count(cur.name) > 1:
                break  # another data path merges in (residual add, concatenation, x * x)
            if nxt.op in WEIGHT_OPS:
                if (
                    nxt.attrs.get("type") != "Bilinear"
                    and not (_is_depthwise(first) or _is_depthwise(nxt))
                    and not _is_bottleneck(first, nxt)
                ):
                    pairs.append((first, between, nxt))
                break
            if nxt.op in _LINEAR_PASS or nxt.op in _AFFINE_WITH_CONSTANT:
                between.append(nxt)
                cur = nxt
                continue
            break
    return pairs


@rule("ND107")
def linear_collapse(ctx: Context):
    graph: Graph = ctx.graph
    for first, between, second in collapsing_pairs(graph):
        via = ", ".join(sorted({n.op for n in between})) if between else "nothing"
        message = (
            f"{first.label} ({_describe(first)}) feeds {second.label} "
            f"({_describe(second)}) through {via}: no activation, normalization, "
            "max-pooling, multiplication or branching in between, so the two layers "
            "compose to a single linear map (W2·W1). The extra layer adds parameters but "
            "no expressive power. Insert a nonlinearity between them, or merge them into "
            "one layer if the factorization is deliberate."
        )
        yield ctx.finding(
            "ND107",
            message,
            module=first.label,
            location=first.location,
            fix=_activation_fix(first, second),
            evidence={
                "first": first.label,
                "second": second.label,
                "between": [n.op for n in between],
            },
            impact=3.0,
        )


def _activation_fix(first: Node, second: Node) -> Fix:
    summary = f"insert an activation (e.g. nn.ReLU()) between {first.label} and {second.label}"
    snippet = (
        f"nn.ReLU(),  # in the nn.Sequential, right after {first.label}\n"
        f"# or in forward: x = torch.relu(self.{first.module or 'layer'}(x))"
    )
    if first.location is None:
        return Fix(summary, snippet, "snippet", safe=False)
    path, line = first.location.path, first.location.line
    prefix = nn_prefix(read(path) or "")
    fix = diff_fix(
        summary,
        path,
        lambda src: insert_args_after(src, {line: f"{prefix}ReLU()"}),
        snippet,
        safe=False,
    )
    if fix.kind == "diff":
        return fix
    site, attr = call_site(first), module_attr(first)
    if site is not None and attr:
        func = torch_function_prefix(read(site.path) or "")
        if func:
            return diff_fix(
                summary,
                site.path,
                lambda src: wrap_call(src, site.line, (attr,), f"{func}relu"),
                snippet,
                safe=False,
            )
    return fix


# -- ND108 detached-forward ---------------------------------------------------------------------

_GRAD_CONTEXTS = ("no_grad", "inference_mode", "set_grad_enabled")


def _cut(node: Node) -> bool:
    return node.op == "detach" or bool(node.attrs.get("no_grad"))


def _trainable(node: Node) -> int:
    return sum(p.numel for p in node.params.values() if p.trainable)


def starved_by_cuts(graph: Graph) -> dict[str, tuple[Node, list[Node]]]:
    """{cut node name: (cut node, [parameterized nodes it starves])}. A node is starved when its
    output reaches a model output, but only through a detach or a no_grad region."""
    live: set[str] = set()  # nodes the output's gradient reaches
    stack = [n.name for n in graph.outputs]
    while stack:
        name = stack.pop()
        if name in live or name not in graph.nodes:
            continue
        live.add(name)
        if not _cut(graph.nodes[name]):
            stack.extend(graph.nodes[name].inputs)
    reach = graph.reaching_output()

    def keys(node: Node) -> set[tuple[str | None, str]]:
        return {(node.module, name) for name, p in node.params.items() if p.trainable}

    # A parameter used in several places (a module call and a `self.fc.weight.detach()`
    # elsewhere) trains as long as one of its uses is live.
    live_params = set().union(
        *(keys(n) for n in graph if n.name in live and not n.attrs.get("no_grad"))
    )
    groups: dict[str, tuple[Node, list[Node]]] = {}
    for node in graph:
        if not _trainable(node) or node.name not in reach:
            continue
        if node.name in live and not node.attrs.get("no_grad"):
            continue
        if keys(node) <= live_params:
            continue
        # The cuts where the gradient stops on the way from this node to the output: the
        # first cut nodes downstream that the gradient still reaches.
        frontier, seen = [], set()
        todo = [node.name]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            cur = graph.nodes[n]
            if _cut(cur) and n in live:
                frontier.append(cur)
                continue
            todo.extend(s.name for s in graph.successors(n))
        for cut in frontier[:1] or [node]:
            groups.setdefault(cut.name, (cut, []))[1].append(node)
    return groups


def _cut_location(cut: Node):
    loc = call_site(cut) if cut.module else cut.location
    if cut.attrs.get("via") == ".data" and loc is not None and loc.line:
        loc = _data_access_line(loc)
    return loc


def _data_access_line(loc):
    """torch.fx creates the node for `x.data` lazily, when the attribute is first used, so its
    line may be the use (`return self.head(features)`) rather than `features = x.data`: take the
    nearest line at or above it that reads `.data`."""
    import re

    from netdoctor.findings import Location

    text = read(loc.path)
    if text is None:
        return loc
    lines = text.splitlines()
    for number in range(min(loc.line, len(lines)), max(0, loc.line - 30), -1):
        if re.search(r"\.data\b", lines[number - 1]):
            return Location(loc.path, number)
    return loc


@rule("ND108")
def detached_forward(ctx: Context):
    graph: Graph = ctx.graph
    for cut, starved in starved_by_cuts(graph).values():
        modules: dict[str, int] = defaultdict(int)
        for n in starved:
            modules[n.module or n.name] += _trainable(n)
        names = sorted(modules)
        count = sum(modules.values())
        loc = _cut_location(cut)
        text = source_line(loc)
        if cut.attrs.get("no_grad") and cut.op != "detach":
            how = "runs inside a torch.no_grad() block in forward"
            kind = "no_grad"
        else:
            via = cut.attrs.get("via") or f".{cut.target.rsplit('.', 1)[-1]}()"
            how = f"is cut from the autograd graph by {via}"
            kind = via
        shown = ", ".join(names) if len(names) <= 6 else ", ".join(names[:5] + ["..."])
        message = (
            f"the output of {shown} {how}"
            + (f" (`{text}`" + (f", line {loc.line})" if loc else ")") if text else "")
            + f": {len(names)} module(s) with {count:,} trainable parameters reach the "
            "output only through it, so they receive no gradient and never train "
            "(the optimizer leaves them at their initial values). If freezing them is "
            "intended, call .requires_grad_(False) on them instead."
        )
        common = ".".join(_common_prefix([n.split(".") for n in names]))
        yield ctx.finding(
            "ND108",
            message,
            module=common or names[0],
            location=loc,
            fix=_detach_fix(cut, kind, loc),
            evidence={
                "cut": kind,
                "starved_modules": names,
                "trainable_parameters": count,
                "line": loc.line if loc else None,
            },
            impact=20.0 + count / 1e6,
        )


def _common_prefix(parts: list[list[str]]) -> list[str]:
    out: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return out


def _detach_fix(cut: Node, kind: str, loc) -> Fix:
    if kind == "no_grad":
        summary = "remove the torch.no_grad() block from forward (keep its body)"
        snippet = "# in forward, un-indent the body of `with torch.no_grad():` and drop the with"
        if loc is None:
            return Fix(summary, snippet, "snippet")
        return diff_fix(
            summary, loc.path, lambda src: unwrap_with(src, loc.line, _GRAD_CONTEXTS), snippet
        )
    if kind == ".data":
        summary = "use the tensor itself instead of its .data (which is detached)"
        snippet = "features = x  # not x.data"
        if loc is None:
            return Fix(summary, snippet, "snippet")
        return diff_fix(
            summary, loc.path, lambda src: unwrap_attribute(src, loc.line, "data"), snippet
        )
    if kind in (".detach()", ".detach_()"):
        summary = "remove the .detach() so the gradient reaches the layers before it"
        snippet = "features = x  # not x.detach()"
        if loc is None:
            return Fix(summary, snippet, "snippet")
        return diff_fix(
            summary,
            loc.path,
            lambda src: unwrap_call(src, loc.line, ("detach", "detach_")),
            snippet,
        )
    return Fix(
        f"keep the value a tensor in forward: {kind} turns it into a Python/NumPy value "
        "with no gradient (use torch operations instead)",
        f"# instead of t{kind}, use t itself (tensor operations keep the gradient)",
        "snippet",
        safe=False,
    )


# -- ND109 bias-before-norm ----------------------------------------------------------------------

_CANCELLING_NORMS = {"batchnorm", "instancenorm"}  # per-channel mean subtracted: bias cancelled


@rule("ND109")
def bias_before_norm(ctx: Context):
    graph: Graph = ctx.graph
    memo: dict[str, bool] = {}
    seen: set[str] = set()
    groups: dict[object, list[tuple[Node, Node]]] = {}  # one finding per construction line
    for layer in graph.of_op(*WEIGHT_OPS):
        bias = layer.params.get("bias")
        key = layer.module or layer.name
        if not layer.attrs.get("has_bias") or bias is None or not bias.trainable or key in seen:
            continue
        consumers = data_consumers(graph, layer.name, memo)
        while len(consumers) == 1 and consumers[0].op == "identity":
            consumers = data_consumers(graph, consumers[0].name, memo)
        if len(consumers) != 1 or consumers[0].op not in _CANCELLING_NORMS:
            continue
        norm = consumers[0]
        if len(data_inputs(graph, norm, memo)) != 1:
            continue
        seen.add(key)
        groups.setdefault(layer.location or key, []).append((layer, norm))
    for pairs in groups.values():
        layer, norm = pairs[0]
        loc = layer.location
        numel = sum(lay.params["bias"].numel for lay, _ in pairs)
        kind = norm.attrs.get("type", norm.op)
        if len(pairs) == 1:
            who = f"{layer.label} ({_describe(layer)}) has a bias, but its output goes"
        else:
            names = ", ".join(lay.label for lay, _ in pairs[:5]) + (
                ", ..." if len(pairs) > 5 else ""
            )
            who = (
                f"{len(pairs)} {layer.attrs.get('type', layer.op)} layers built on the same "
                f"line ({names}) have a bias, but each one's output goes"
            )
        message = (
            f"{who} straight into a {kind} ({norm.label}"
            + (", ..." if len(pairs) > 1 else "")
            + f"), which subtracts the per-channel mean: the {numel} bias values are "
            "cancelled exactly, get zero gradient and only cost memory (the norm's own "
            "shift, beta, plays the bias's role)."
        )
        summary = (
            "construct " + (layer.label if len(pairs) == 1 else "these layers") + " with bias=False"
        )
        snippet = f"nn.{layer.attrs.get('type', 'Conv2d')}(..., bias=False)"
        types = (layer.attrs["type"],) if layer.attrs.get("type") else ()
        fix = (
            diff_fix(
                summary,
                loc.path if loc else None,
                lambda src, line=loc.line if loc else 0, types=types: set_keyword(
                    src, line, types, "bias", "False"
                ),
                snippet,
            )
            if layer.module
            else Fix(summary, snippet, "snippet")
        )
        yield ctx.finding(
            "ND109",
            message,
            module=layer.module,
            location=loc,
            fix=fix,
            evidence={
                "layers": [lay.label for lay, _ in pairs],
                "norms": [n.label for _, n in pairs],
                "bias_numel": numel,
            },
            impact=0.2,
        )


# -- ND110 dropout-before-batchnorm -------------------------------------------------------------


@rule("ND110")
def dropout_before_batchnorm(ctx: Context):
    graph: Graph = ctx.graph
    for drop in graph.of_op("dropout"):
        if drop.attrs.get("type") == "AlphaDropout" or drop.attrs.get("p") == 0:
            continue
        norms = [
            n
            for n in graph.downstream(drop.name, through={"reshape", "identity"})
            if n.op == "batchnorm"
        ]
        if not norms:
            continue
        norm = norms[0]
        p = drop.attrs.get("p")
        message = (
            f"{drop.label} ({drop.attrs.get('type', 'dropout')}"
            + (f", p={p:g}" if isinstance(p, float) else "")
            + f") feeds {norm.label} ({norm.attrs.get('type', 'BatchNorm')}): in training "
            "BatchNorm's running variance is estimated on dropout-scaled activations, "
            "in eval dropout is off and the variance is different, so eval outputs are "
            "shifted (the 'variance shift' of Li et al., 2019). Put dropout after the "
            "last BatchNorm (e.g. right before the classifier) instead."
        )
        snippet = (
            "# move the dropout after the BatchNorm (or after the last BatchNorm):\n"
            f"nn.{norm.attrs.get('type', 'BatchNorm1d')}(...),\n"
            f"nn.{drop.attrs.get('type', 'Dropout')}(p={p if p is not None else 0.5}),"
        )
        yield ctx.finding(
            "ND110",
            message,
            module=drop.module,
            location=drop.location if drop.module else call_site(drop),
            fix=Fix(
                "move the dropout after the BatchNorm (or after the last BatchNorm), or remove it",
                snippet,
                "snippet",
                safe=False,
            ),
            evidence={"dropout": drop.label, "norm": norm.label, "p": p},
            impact=0.5,
        )


# -- ND111 redundant-activation -----------------------------------------------------------------

_IDEMPOTENT = {"relu", "relu6", "hardtanh"}
# "In a row": only ops that move values around without computing (a max-pool between two ReLUs
# also makes the second redundant, but that is the ordinary conv-relu-pool-block layout).
_RANGE_KEEPING = {"reshape", "identity", "getitem"}


def _same_activation(a: Node, b: Node) -> bool:
    if a.op != b.op:
        return False
    if a.op == "hardtanh":
        keys = ("min_val", "max_val")
        return all(k in a.attrs and a.attrs.get(k) == b.attrs.get(k) for k in keys)
    return True


@rule("ND111")
def redundant_activation(ctx: Context):
    graph: Graph = ctx.graph
    memo: dict[str, bool] = {}
    seen_lines: set = set()
    for second in graph.of_op(*_IDEMPOTENT):
        if len(data_inputs(graph, second, memo)) != 1:
            continue
        through = _RANGE_KEEPING | ({"dropout"} if second.op == "relu" else set())
        producers = [
            n
            for n in graph.upstream(second.name, through=through)
            if not is_constant(graph, n.name, memo)
        ]
        if len(producers) != 1 or not _same_activation(producers[0], second):
            continue
        first = producers[0]
        where = second.location if second.module else call_site(second)
        if where is not None:
            if where in seen_lines:
                continue  # the same line of code run again (a block used twice)
            seen_lines.add(where)
        kind = second.attrs.get("type", second.op)
        message = (
            f"{op_label(second)} is applied to the output of {op_label(first)}, "
            f"the same activation: {second.op} is idempotent ({second.op}({second.op}(x)) = "
            f"{second.op}(x)), so the second one does nothing but cost a pass over the "
            "tensor. Often a sign that a layer was meant to sit between them."
        )
        summary = f"remove the second {kind} " + (
            f"({second.module})" if second.module else f"(line {where.line})" if where else ""
        )
        snippet = f"# drop {second.label}: it repeats {first.label}"
        yield ctx.finding(
            "ND111",
            message,
            module=second.module,
            location=where,
            fix=remove_op_fix(second, summary, snippet, safe=True),
            evidence={"first": first.label, "second": second.label, "activation": second.op},
            impact=0.1,
        )
