"""ND102 saturating-activation-chain: 3+ sigmoid/tanh activations in series without
normalization between (doc: rules/ND102.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import diff_fix, nn_prefix, read, replace_calls
from netdoctor.graph.ir import NORM_OPS, SATURATING_OPS, Graph, Node
from netdoctor.graph.walks import is_constant
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext

# Ops a value may pass through (dtype casts included) and still be "the same" tensor for gating
# checks.
_PASS_THROUGH = {"reshape", "identity", "dropout", "getitem", "split", "to", "type_as", "float"}


@dataclass(frozen=True)
class Options(RuleOptions):
    min_chain: int = 3  # saturating activations in series before the rule fires


_AFFINE = {"add", "sub", "mul", "div"}


def _is_gate(graph: Graph, node: Node) -> bool:
    """x * sigmoid(g): the activation scales another tensor instead of feeding the next layer,
    also once shifted or scaled by a constant or a parameter on the way (`sigmoid(g) + eps`,
    `2 * sigmoid(g)`: the gates of hyper-connections and of gated residual mixes)."""
    memo: dict[str, bool] = {}
    stack = [(s.name, node.name) for s in graph.successors(node.name)]
    seen: set[str] = set()
    found = False
    while stack:
        name, via = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        consumer = graph.nodes[name]
        if consumer.op in _PASS_THROUGH:
            stack.extend((s.name, name) for s in graph.successors(name))
            continue
        data = [i for i in consumer.inputs if i != via and not is_constant(graph, i, memo)]
        if consumer.op in _AFFINE and not data:
            stack.extend((s.name, name) for s in graph.successors(name))  # still the gate
            continue
        if consumer.op not in ("mul", "div"):
            return False
        found = True
    return found


def _scaled_by_constant(graph: Graph, node: Node, memo: dict[str, bool]) -> bool:
    """`x * c` or `x / c` with c a number or a constant tensor."""
    return node.op in ("mul", "div") and (
        bool(node.attrs.get("constants")) or any(is_constant(graph, i, memo) for i in node.inputs)
    )


def _is_soft_cap(graph: Graph, node: Node) -> bool:
    """`cap * tanh(x / cap)`: soft-capping (Gemma 2's attention scores and final logits) bounds
    the outliers of x and passes the rest unchanged (the gradient is ~1 for |x| well below the
    cap), so it is no saturating activation in series: the division before and the scaling after
    undo each other around the tanh's linear range."""
    if node.op != "tanh" or not node.inputs or node.inputs[0] not in graph.nodes:
        return False
    memo: dict[str, bool] = {}
    if not _scaled_by_constant(graph, graph.nodes[node.inputs[0]], memo):
        return False
    consumers = graph.downstream(node.name, through=_PASS_THROUGH)
    return bool(consumers) and all(
        c.op == "mul" and _scaled_by_constant(graph, c, memo) for c in consumers
    )


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    graph = ctx.graph
    min_chain = options.min_chain
    chains: dict[str, list[Node]] = {}
    for node in graph.topological():
        incoming = [chains[i] for i in node.inputs if i in chains]
        if node.op in NORM_OPS or node.op in ("input", "param", "rnn", "attention"):
            chains[node.name] = []
            continue
        best = max(incoming, key=len) if incoming else []
        if (
            node.op in SATURATING_OPS
            and not _is_gate(graph, node)
            and not _is_soft_cap(graph, node)
        ):
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
    yield RULE.finding(
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
    sites = [n.location for n in chain if n.module and n.location]
    paths = {loc.path for loc in sites}
    if len(sites) != len(chain) or len(paths) != 1:
        return Fix(summary, snippet, "snippet", safe=False)
    path = paths.pop()
    prefix = nn_prefix(read(path) or "")
    lines = [loc.line or 0 for loc in sites]  # (no line: an ONNX node, nothing to edit)
    return diff_fix(
        summary,
        path,
        lambda src: replace_calls(src, lines, ("Sigmoid", "Tanh"), f"{prefix}ReLU()"),
        snippet,
        safe=False,
    )


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """The chain's sigmoid/tanh modules replaced by ReLU, in a copy of the model."""
    from netdoctor.fixes.memory import swap_to_relu

    acts = [a for a in finding.evidence.get("activations", []) if isinstance(a, str)]
    return (
        Remedy(
            RULE.id,
            f"{len(acts)} sigmoid/tanh activations replaced by ReLU",
            "model",
            model_fn=swap_to_relu(acts),
        )
        if acts
        else None
    )


RULE = Rule(
    "ND102",
    "saturating-activation-chain",
    Severity.WARNING,
    Stage.GRAPH,
    summary="3+ sigmoid/tanh activations in series without normalization between",
    check=check,
    options=Options,
    consequence="ND403",
    remedy=remedy,
    fixture=Fixture("check", ("fixtures/sick/lenet_sigmoid.py:LeNet",)),
    healthy=Fixture("check", ("fixtures/healthy/lenet_relu.py:LeNet",)),
)
