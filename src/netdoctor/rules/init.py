"""ND201, ND204: initialization scale (per layer, from the weights; across depth, measured)."""

from __future__ import annotations

import math
from collections import Counter

from netdoctor.findings import Fix
from netdoctor.fixes.patch import append_to_init, diff_fix, nn_prefix, read
from netdoctor.graph.ir import RELU_FAMILY, WEIGHT_OPS, Graph, Node
from netdoctor.rules._paths import absorbed, reaches_output_directly
from netdoctor.rules.architecture import relu_fix
from netdoctor.rules.registry import Context, rule

# Ops between a layer and "the activation that follows it".
_TO_ACTIVATION = {"reshape", "identity", "dropout", "avgpool", "maxpool", "getitem", "pad",
                  "upsample"}
# Below this many weights a sample std is too noisy to judge (PyTorch's default init sits 2.45x
# below He; with 64 uniform weights the sample std's spread is ~6%, so 3x stays 3+ sigma away).
_MIN_WEIGHTS = 64
# kaiming_normal_'s nonlinearity argument for the activation that follows.
_NONLINEARITY = {"tanh": "tanh", "sigmoid": "sigmoid", "selu": "selu"}


def following_activation(graph: Graph, node: Node) -> Node | None:
    nxt = graph.downstream(node.name, through=_TO_ACTIVATION)
    return nxt[0] if len(nxt) == 1 else None


def _nonlinearity(act: Node | None) -> str:
    if act is None:
        return "linear"
    if act.op in RELU_FAMILY and act.op not in ("selu",):
        return "leaky_relu" if act.op == "leaky_relu" else "relu"
    return _NONLINEARITY.get(act.op, "linear")


def _gain(nonlinearity: str, act: Node | None) -> float:
    """The fan-in-preserving gain the rule compares against: He sqrt(2) for the ReLU family
    (sqrt(2 / (1 + a^2)) for LeakyReLU), LeCun 1 for everything else."""
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = act.attrs.get("negative_slope", 0.01) if act is not None else 0.01
        return math.sqrt(2.0 / (1.0 + float(slope) ** 2))
    return 1.0


def fan_in(shape: tuple[int, ...]) -> int | None:
    """torch.nn.init's convention: weight.shape[1] * receptive field (conv: in/groups * k*k)."""
    if len(shape) < 2:
        return None
    return int(math.prod(shape[1:])) or None


def init_fix(graph: Graph, layers: list[Node], nonlinearity: str) -> Fix:
    """An init loop: a diff appending it to the model class's __init__ when that can be found,
    else a paste-ready snippet."""
    types = sorted({n.attrs["type"] for n in layers if n.attrs.get("type")}) or ["Linear"]
    summary = ("initialise the weights for the activation that follows: "
               f"nn.init.kaiming_normal_(m.weight, nonlinearity=\"{nonlinearity}\") "
               "(fan-in-preserving: He for ReLU, LeCun gain for tanh/sigmoid/none)")

    def code(prefix: str) -> str:
        classes = ", ".join(f"{prefix}{t}" for t in types)
        classes = f"({classes},)" if len(types) == 1 else f"({classes})"
        return ("for m in self.modules():\n"
                f"    if isinstance(m, {classes}):\n"
                f"        {prefix}init.kaiming_normal_(m.weight, nonlinearity=\"{nonlinearity}\")\n"
                "        if m.bias is not None:\n"
                f"            {prefix}init.zeros_(m.bias)\n")

    snippet = "# at the end of the model's __init__:\n" + code("nn.")
    root = graph.root_location
    if root is None or not root.line:
        return Fix(summary, snippet, "snippet")
    prefix = nn_prefix(read(root.path) or "")
    return diff_fix(summary, root.path, lambda src: append_to_init(src, root.line, code(prefix)),
                    snippet)


# -- ND201 init-scale ---------------------------------------------------------------------------

def init_scale_outliers(graph: Graph, factor: float) -> list[dict]:
    memo: dict[str, bool] = {}
    seen: set[str] = set()
    found = []
    for node in graph.topological():
        if node.op not in WEIGHT_OPS:
            continue
        key = node.module or node.name
        w = node.params.get("weight")
        if key in seen or w is None or not w.trainable or w.all_equal or w.std <= 0:
            continue
        seen.add(key)
        if w.numel < _MIN_WEIGHTS:
            continue  # too few weights for their std to say anything about the init
        if node.attrs.get("type") == "Bilinear" or node.attrs.get("no_grad"):
            continue
        n_in = fan_in(w.shape)
        if not n_in:
            continue
        if reaches_output_directly(graph, node.name):
            continue  # the output layer: small or zero heads are a deliberate choice
        if absorbed(graph, node.name, memo):
            continue  # normalized afterwards, or inside a residual branch / gate
        act = following_activation(graph, node)
        nl = _nonlinearity(act)
        target = _gain(nl, act) / math.sqrt(n_in)
        ratio = w.std / target
        if 1.0 / factor <= ratio <= factor:
            continue
        found.append({"node": node, "std": w.std, "target": target, "ratio": ratio,
                      "fan_in": n_in, "activation": act.op if act is not None else None,
                      "nonlinearity": nl})
    return found


@rule("ND201")
def init_scale(ctx: Context):
    graph: Graph = ctx.graph
    if graph.frontend == "onnx":
        return  # exported weights are usually trained ones: their scale says nothing of init
    factor = float(ctx.option("ND201", "factor", 3.0))
    bad = init_scale_outliers(graph, factor)
    if not bad:
        return
    parts = []
    for b in bad[:4]:
        node = b["node"]
        scale = "He sqrt(2/fan_in)" if b["nonlinearity"] in ("relu", "leaky_relu") else \
            "LeCun sqrt(1/fan_in)"
        after = f"the {b['activation']} that follows" if b["activation"] else "no activation"
        direction = "below" if b["ratio"] < 1 else "above"
        times = 1 / b["ratio"] if b["ratio"] < 1 else b["ratio"]
        parts.append(f"{node.label} weight std {b['std']:.3g} is {times:.1f}x {direction} the "
                     f"{scale} = {b['target']:.3g} for fan-in {b['fan_in']} and {after}")
    more = f" (and {len(bad) - 4} more layers)" if len(bad) > 4 else ""
    shrink = sum(b["ratio"] < 1 for b in bad)
    effect = ("each such layer shrinks the signal (and the gradient) by that factor, so deep "
              "layers see almost nothing and learning stalls" if shrink >= len(bad) / 2 else
              "each such layer amplifies the signal by that factor: activations and gradients "
              "blow up (loss NaN) or saturate")
    message = (f"{'; '.join(parts)}{more}: {effect}. No normalization layer follows to undo "
               f"it. Threshold: {factor:g}x either way (PyTorch's default init is 2.4x below He "
               "and passes).")
    common = Counter(b["nonlinearity"] for b in bad).most_common(1)[0][0]
    first = bad[0]["node"]
    yield ctx.finding(
        "ND201", message, module=first.label, location=first.location,
        fix=init_fix(graph, [b["node"] for b in bad], common),
        evidence={"factor": factor, "layers": [
            {"module": b["node"].label, "std": b["std"], "expected": b["target"],
             "ratio": b["ratio"], "fan_in": b["fan_in"], "activation": b["activation"]}
            for b in bad]},
        impact=5.0 + len(bad))


# -- ND204 signal-collapse ----------------------------------------------------------------------

def signal_chain(graph: Graph) -> list[Node]:
    """Hidden weight layers (heads and constant-initialized layers left out) with a measured
    output scale, in topological order."""
    chain, seen = [], set()
    for node in graph.topological():
        if node.op not in WEIGHT_OPS or "init_signal_rms" not in node.attrs:
            continue
        key = node.module or node.name
        w = node.params.get("weight")
        if key in seen or (w is not None and w.all_equal):
            continue
        seen.add(key)
        if reaches_output_directly(graph, node.name):
            continue
        chain.append(node)
    return chain


@rule("ND204")
def signal_collapse(ctx: Context):
    graph: Graph = ctx.graph
    limit = float(ctx.option("ND204", "max-ratio", 1e5))
    chain = signal_chain(graph)
    if len(chain) < 2:
        return
    inputs = [n for n in graph.of_op("input") if n.attrs.get("init_signal_rms")]
    start_value = inputs[0].attrs["init_signal_rms"] if inputs else chain[0].attrs[
        "init_signal_rms"]
    start_label = "the input" if inputs else chain[0].label
    values = [n.attrs["init_signal_rms"] for n in chain]
    tiny = 1e-30
    crossing = None
    for node, v in zip(chain, values):
        ratio = max(v, tiny) / max(start_value, tiny)
        if ratio > limit or ratio < 1.0 / limit:
            crossing = (node, ratio)
            break
    if crossing is None:
        return
    node, _ = crossing
    last = chain[-1]
    end_ratio = max(values[-1], tiny) / max(start_value, tiny)
    lo, hi = min(values), max(values)
    grows = end_ratio > 1 if (end_ratio > limit or end_ratio < 1 / limit) else crossing[1] > 1
    verb = "grows" if grows else "shrinks"
    message = (f"at initialization the signal {verb} by orders of magnitude across depth: on a "
               f"unit-variance batch, the input-dependent RMS is {start_value:.3g} at "
               f"{start_label}, {node.attrs['init_signal_rms']:.3g} at {node.label} and "
               f"{values[-1]:.3g} at {last.label} (x{end_ratio:.3g} over {len(chain)} hidden "
               f"layers; range {lo:.3g}..{hi:.3g}). "
               + ("Deep layers receive (and send back) almost no signal: the loss barely moves."
                  if not grows else "Activations and gradients explode: loss NaN or "
                  "saturated units.") + f" Threshold: x{limit:g} either way.")
    acts = [following_activation(graph, n) for n in chain]
    nl = Counter(_nonlinearity(a) for a in acts).most_common(1)[0][0]
    if nl == "sigmoid":
        # No init scale carries a signal through a sigmoid chain (slope <= 1/4 per layer, mean
        # 0.5): the activation is the cause, so the fix is ND102's.
        fix = relu_fix([a for a in acts if a is not None and a.op in ("sigmoid", "tanh")])
    else:
        fix = init_fix(graph, chain, nl)
    yield ctx.finding(
        "ND204", message, module=node.label, location=node.location, fix=fix,
        evidence={"max_ratio": limit, "start": start_value, "end_ratio": end_ratio,
                  "layers": [{"module": n.label, "signal_rms": n.attrs["init_signal_rms"],
                              "rms": n.attrs.get("init_rms")} for n in chain]},
        impact=6.0)
