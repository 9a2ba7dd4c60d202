"""ND1xx: problems visible in the graph's structure."""

from __future__ import annotations

from collections import defaultdict

from netdoctor.findings import Fix, Location
from netdoctor.fixes.patch import (
    arg_code,
    attribute_line,
    diff_fix,
    insert_args_after,
    nn_prefix,
    read,
    replace_calls,
    wrap_attribute,
)
from netdoctor.graph.ir import MERGE_OPS, NORM_OPS, SATURATING_OPS, WEIGHT_OPS, Graph, Node
from netdoctor.rules._paths import standardized_weight
from netdoctor.rules.registry import Context, rule

# Ops a value may pass through and still be "the same" tensor for gating checks.
_PASS_THROUGH = {"reshape", "identity", "dropout", "getitem", "split"}


def _where(node: Node) -> str:
    return f"{node.label} ({node.location})" if node.location else node.label


# -- ND101 deep-plain-stack ------------------------------------------------------------------


def plain_chains(graph: Graph) -> dict[str, list[Node]]:
    """For each node, the longest chain of weight layers reaching it with no normalization
    layer and no skip connection between. A merge (add/cat of two paths) keeps the SHORTEST
    incoming chain: the skip path is how the gradient gets around the stack, whatever gain
    either path is multiplied by. A layer whose weight is standardized in its forward (scaled
    weight standardization) normalizes like a layer followed by a normalization layer."""
    chains: dict[str, list[Node]] = {}
    memo: dict[str, bool] = {}
    for node in graph.topological():
        incoming = [chains[i] for i in node.inputs if i in chains]
        if (
            node.op in NORM_OPS
            or node.op in ("input", "param")
            or standardized_weight(graph, node, memo)
        ):
            chains[node.name] = []
            continue
        real = [
            c
            for i, c in zip(node.inputs, incoming)
            if graph.nodes.get(i) is not None and graph.nodes[i].op != "param"
        ]
        if node.op in MERGE_OPS and len(real) >= 2:
            best = min(real, key=len)
        else:
            best = max(incoming, key=len) if incoming else []
        chains[node.name] = best + [node] if node.op in WEIGHT_OPS else best
    return chains


@rule("ND101")
def deep_plain_stack(ctx: Context):
    graph: Graph = ctx.graph
    min_depth = int(ctx.option("ND101", "min-depth", 7))
    chains = plain_chains(graph)
    if not chains:
        return
    chain = max(chains.values(), key=len)
    if len(chain) < min_depth:
        return
    names = [n.label for n in chain]
    shown = ", ".join(names) if len(names) <= 8 else ", ".join(names[:4] + ["..."] + names[-3:])
    message = (
        f"{len(chain)} weight layers in series ({shown}) with no normalization layer and "
        f"no skip connection between them: gradients shrink or grow layer by layer "
        f"(loss NaN or stuck at chance, as in the AlexNet-on-FashionMNIST report). "
        f"Threshold: {min_depth}."
    )
    yield ctx.finding(
        "ND101",
        message,
        module=chain[0].label,
        location=chain[0].location,
        fix=_batchnorm_fix(chain),
        evidence={
            "depth": len(chain),
            "min_depth": min_depth,
            "layers": [
                {"module": n.label, "op": n.op, "line": n.location.line if n.location else None}
                for n in chain
            ],
        },
        impact=float(len(chain)),
    )


def _norm_for(node: Node, prefix: str) -> str | None:
    if node.op == "conv":
        dims = len(node.attrs.get("kernel_size", (3, 3)))
        channels = node.attrs.get("out_channels")
        return f"{prefix}BatchNorm{dims}d({channels})" if channels else None
    if node.op == "linear":
        features = node.attrs.get("out_features")
        return f"{prefix}BatchNorm1d({features})" if features else None
    return None


def _norm_from_call(norm: str):
    """BatchNorm text whose size reuses the layer's own argument text (`width`, not 128)."""

    def make(call) -> str:
        name, _, size = norm.rpartition("(")
        keyword = "out_channels" if "2d" in name or "3d" in name else "out_features"
        if "1d" in name and "Conv" in str(getattr(call.func, "attr", "")):
            keyword = "out_channels"
        code = arg_code(call, 1, keyword)
        return f"{name}({code})" if code else norm

    return make


def _batchnorm_fix(chain: list[Node]) -> Fix:
    hidden = chain[:-1]  # the last layer produces the output: no BatchNorm after it
    summary = (
        f"insert BatchNorm after each of the {len(hidden)} hidden weight layers "
        "(or add residual connections)"
    )
    paths = {n.location.path for n in hidden if n.location}
    lines = [n.location.line for n in hidden if n.location]
    snippet_lines = []
    for n in hidden:
        norm = _norm_for(n, "nn.")
        if norm:
            snippet_lines.append(f"# after {n.label} ({n.attrs.get('type', n.op)}):\n{norm},")
    snippet = "\n".join(snippet_lines)
    # Layers built in a loop share a line: one insertion there serves them all, as long as the
    # output layer is not among them (no BatchNorm after the logits).
    last = chain[-1].location
    if (
        len(paths) != 1
        or len(lines) != len(hidden)
        or (last and last.path in paths and last.line in lines)
    ):
        return Fix(summary, snippet or None, "snippet")
    path = paths.pop()
    source = read(path) or ""
    prefix = nn_prefix(source)
    inserts, kinds = {}, {}
    for n in hidden:
        norm = _norm_for(n, prefix)
        if norm is None:
            return Fix(summary, snippet or None, "snippet")
        kind = norm.split("(")[0]  # layers sharing a line (a loop) must want the same norm
        if kinds.setdefault(n.location.line, kind) != kind:
            return Fix(summary, snippet or None, "snippet")
        inserts[n.location.line] = _norm_from_call(norm)
    types = tuple(sorted({n.attrs["type"] for n in hidden if n.attrs.get("type")}))
    return diff_fix(summary, path, lambda src: insert_args_after(src, inserts, types), snippet)


# -- ND102 saturating-activation-chain --------------------------------------------------------


def _is_gate(graph: Graph, node: Node) -> bool:
    """x * sigmoid(g): the activation scales another tensor instead of feeding the next layer."""
    consumers = graph.downstream(node.name, through=_PASS_THROUGH)
    return bool(consumers) and all(c.op in ("mul", "div") for c in consumers)


@rule("ND102")
def saturating_chain(ctx: Context):
    graph: Graph = ctx.graph
    min_chain = int(ctx.option("ND102", "min-chain", 3))
    chains: dict[str, list[Node]] = {}
    for node in graph.topological():
        incoming = [chains[i] for i in node.inputs if i in chains]
        if node.op in NORM_OPS or node.op in ("input", "param", "rnn", "attention"):
            chains[node.name] = []
            continue
        best = max(incoming, key=len) if incoming else []
        if node.op in SATURATING_OPS and not _is_gate(graph, node):
            best = best + [node]
        chains[node.name] = best
    chain = max(chains.values(), key=len, default=[])
    if len(chain) < min_chain:
        return
    kinds = sorted({n.op for n in chain})
    message = (
        f"{len(chain)} {'/'.join(kinds)} activations in series "
        f"({', '.join(n.label for n in chain)}) with no normalization between: each "
        f"multiplies the gradient by at most {0.25 if kinds == ['sigmoid'] else 1.0:g} "
        f"and saturated units pass almost none, so early layers barely learn "
        f"(vanishing gradients). Threshold: {min_chain}."
    )
    yield ctx.finding(
        "ND102",
        message,
        module=chain[0].label,
        location=chain[0].location,
        fix=relu_fix(chain),
        evidence={
            "length": len(chain),
            "min_chain": min_chain,
            "activations": [n.label for n in chain],
        },
        impact=float(len(chain)),
    )


def relu_fix(chain: list[Node]) -> Fix:
    """Replace the chain's sigmoid/tanh modules with ReLU (one diff when all live in one file)."""
    summary = "use ReLU instead of sigmoid/tanh in hidden layers (or insert BatchNorm before them)"
    snippet = "\n".join(
        f"nn.ReLU(),  # instead of {n.attrs.get('type', n.op)} at {n.label}" for n in chain
    )
    modules = [n for n in chain if n.module and n.location]
    paths = {n.location.path for n in modules}
    if len(modules) != len(chain) or len(paths) != 1:
        return Fix(summary, snippet, "snippet", safe=False)
    path = paths.pop()
    prefix = nn_prefix(read(path) or "")
    return diff_fix(
        summary,
        path,
        lambda src: replace_calls(
            src, [n.location.line for n in modules], ("Sigmoid", "Tanh"), f"{prefix}ReLU()"
        ),
        snippet,
        safe=False,
    )


# -- ND103 dead-submodule ----------------------------------------------------------------------


@rule("ND103")
def dead_submodule(ctx: Context):
    graph: Graph = ctx.graph
    if not graph.outputs:
        return
    live = graph.reaching_output()
    called: dict[str, list[Node]] = defaultdict(list)
    for node in graph:
        if node.module:
            called[node.module].append(node)

    def covered(path: str, names: set[str]) -> bool:
        """True when the module or an ancestor that ran as one op (e.g. an LSTM) is in names."""
        parts = path.split(".")
        return any(".".join(parts[:i]) in names for i in range(len(parts), 0, -1))

    live_modules = {n.module for n in graph if n.module and n.name in live}
    live_leaf_calls = {n.module for n in graph if n.module and n.name in live and n.op != "param"}
    any_calls = {n.module for n in graph if n.module and n.op != "param"} | set(called)
    for path, info in graph.modules.items():
        if info.trainable == 0:
            continue
        if path in live_modules or covered(path, live_leaf_calls):
            continue
        ran = path in called or covered(path, any_calls)
        if not ran and graph.frontend == "hooks":
            continue  # a recorded forward only shows the branches this input took
        if ran:
            how = (
                "is called in forward but its result never reaches the model output "
                "(computed, then unused)"
            )
        else:
            how = "is never called in forward"
        message = (
            f"{path} ({info.type}, {info.trainable:,} trainable parameters) {how}: its "
            "parameters get no gradient and never train."
        )
        parent = path.rpartition(".")[0]
        hint = (
            "use its output (a residual block returns F.relu(x + y), not F.relu(x))"
            if parent
            else "use its output in forward"
        )
        yield ctx.finding(
            "ND103",
            message,
            module=path,
            location=info.location,
            fix=Fix(f"{hint}, or delete {path}"),
            evidence={"type": info.type, "trainable_parameters": info.trainable, "called": ran},
            impact=float(info.trainable) / 1e6,
        )


# -- ND104 unregistered-submodule ------------------------------------------------------------


@rule("ND104")
def unregistered_submodule(ctx: Context):
    graph: Graph = ctx.graph
    for holder in graph.unregistered:
        owner = holder.owner_class or "the model"
        wrapper = "ModuleDict" if holder.container == "dict" else "ModuleList"
        message = (
            f"{owner}.{holder.attr} is a plain {holder.container} holding "
            f"{holder.count} module(s) ({', '.join(holder.module_types)}): they are "
            "invisible to .parameters(), .to(device), .train()/.eval() and state_dict, "
            "so the optimizer never updates them and they never move to the GPU."
        )
        summary = f"wrap it in nn.{wrapper}: self.{holder.attr} = nn.{wrapper}(...)"
        path = holder.location or holder.owner_location
        empty = "{...}" if wrapper == "ModuleDict" else "[...]"
        fix = Fix(summary, f"self.{holder.attr} = nn.{wrapper}({empty})", "snippet")
        if path is not None:
            prefix = nn_prefix(read(path.path) or "")
            fix = diff_fix(
                summary,
                path.path,
                lambda src, h=holder, prefix=prefix, wrapper=wrapper: wrap_attribute(
                    src,
                    h.attr,
                    f"{prefix}{wrapper}",
                    near_line=h.location.line if h.location else None,
                ),
                fix.patch,
            )
        module = f"{holder.owner}.{holder.attr}" if holder.owner else holder.attr
        location = holder.location
        if location is not None and location.line:  # point at `self.layers = [`
            source = read(location.path)
            line = attribute_line(source, holder.attr, location.line) if source else None
            location = Location(location.path, line) if line else location
        yield ctx.finding(
            "ND104",
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
