"""Deliberate designs of the model zoos that the graph rules must leave alone (issue 15), each
next to the mistake it resembles, which they must still report: a normalization computed in
forward (ND101), a plain stack at He initialization (ND101), a gate broadcast, shifted or scaled
before it multiplies (ND102), a value written in place into a tensor (ND103), a ReLU on a map of
class scores before the global pool (ND106), a patch embedding in strided steps and a fixed blur
filter (ND107), a normalization written out in tensor ops or a normalization module of the
model's own before a small head or after a large layer (ND201). The healthy fixtures
computed_norm, plain_he_cnn, eca_gates, gated_streams, relpos_attention, conv_score_map,
two_step_stem, deep_stem_resnet, blur_pool, written_norm_head and sandwich_norm are the same
designs in full models (their snapshots keep them clean)."""

from __future__ import annotations

import pytest

from conftest import REPO, chdir
from netdoctor.check import CheckOptions, check_loaded

IMAGE = (3, 16, 16)


def rules_found(tmp_path, source: str, cls: str, kwargs: dict, shape=IMAGE) -> list[str]:
    from netdoctor.loading.target import load

    path = tmp_path / "model.py"
    path.write_text(source, encoding="utf-8")
    with chdir(REPO):
        loaded = load(f"{path}:{cls}", kwargs).models[0]
        report = check_loaded(loaded, CheckOptions(input_shape=shape))
    return [f.rule for f in report.findings]


# ------------------------------------------------------------------ ND101: computed normalization

NORMALIZED_STACK = '''
import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    def __init__(self, kind="none", channels=8):
        super().__init__()
        self.kind = kind
        self.gain = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        if self.kind == "std":  # x / std over channels and positions, per sample
            y = x / torch.sqrt(x.flatten(1).var(dim=1).view(-1, 1, 1, 1) + 1e-5)
        elif self.kind == "batch_std":  # x / std over the batch and positions, per channel
            y = x / x.std(dim=(0, 2, 3), keepdim=True).add(1e-5)
        elif self.kind == "rms":  # x * rsqrt(mean of squares over channels)
            y = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-6)
        elif self.kind == "pow":  # the same, as a power
            y = x * (x.pow(2).mean(dim=1, keepdim=True) + 1e-6) ** -0.5
        elif self.kind == "normalize":
            y = F.normalize(x, dim=1)
        elif self.kind == "functional":  # a normalization function called in forward
            y = F.group_norm(x, 2)
        elif self.kind == "constant":  # a learned scale, not a statistic: no normalization
            y = x / torch.sqrt(self.gain.abs() + 1.0)
        else:
            y = x
        return torch.relu(y * self.gain.to(x.dtype))


class WSConv2d(nn.Conv2d):
    """A conv whose weight is standardized in forward (scaled weight standardization)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w / w[0].numel() ** 0.5, self.bias, self.stride, self.padding)


class Net(nn.Module):
    """Nine 3x3 convs in series and a head, no normalization layer, no skip connection.
    `untraceable`: control flow on a shape in forward, so the graph is the recorded forward."""

    def __init__(self, kind="none", untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        conv = WSConv2d if kind == "ws" else nn.Conv2d
        layers, cin = [], 3
        for _ in range(9):
            layers += [conv(cin, 8, 3, padding=1), Scale(kind)]
            cin = 8
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        if self.untraceable and x.shape[1] != 3:
            raise ValueError("three channels expected")
        return self.head(self.body(x).mean(dim=(2, 3)))
'''


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize(
    "kind, plain",
    [
        ("std", False),
        ("batch_std", False),
        ("rms", False),
        ("pow", False),
        ("normalize", False),
        ("functional", False),
        ("ws", False),
        ("none", True),
        ("constant", True),
    ],
)
def test_nd101_sees_a_normalization_computed_in_forward(tmp_path, kind, plain, untraceable):
    kwargs = {"kind": kind, "untraceable": untraceable}
    found = rules_found(tmp_path, NORMALIZED_STACK, "Net", kwargs)
    assert ("ND001" in found) is untraceable
    assert ("ND101" in found) is plain, found


PLAIN_INIT = '''
import torch
from torch import nn


class Net(nn.Module):
    """Nine 3x3 convs with an activation after each and a Linear head: no normalization, no skip
    connection, initialized by `init`."""

    def __init__(self, init="default", act="relu"):
        super().__init__()
        layers, cin = [], 3
        for _ in range(9):
            conv = nn.Conv2d(cin, 16, 3, padding=1)
            if init == "he":
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            elif init == "he_fan_out":
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            elif init == "xavier":
                nn.init.xavier_normal_(conv.weight)
            elif init == "large":
                nn.init.normal_(conv.weight, std=0.3)
            layers += [conv, nn.ReLU() if act == "relu" else nn.Sigmoid()]
            cin = 16
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))
'''


@pytest.mark.parametrize(
    "init, act, plain",
    [
        ("he", "relu", False),  # He gain: the ReLU's halving made up layer by layer
        ("he_fan_out", "relu", False),  # the same for the gradients
        ("default", "relu", True),  # PyTorch's default, 2.45x below He a layer: shrinks
        ("xavier", "relu", True),  # Glorot's gain ignores the ReLU: 1.41x a layer
        ("large", "relu", True),  # grows
        ("he", "sigmoid", True),  # no init carries a gradient through sigmoids
    ],
)
def test_nd101_a_plain_stack_at_the_gain_that_preserves_its_scale(tmp_path, init, act, plain):
    found = rules_found(tmp_path, PLAIN_INIT, "Net", {"init": init, "act": act})
    assert ("ND101" in found) is plain, found


# ------------------------------------------------------------------ ND102: broadcast gates

GATES = '''
import torch
from torch import nn


class Net(nn.Module):
    """Three Linear layers, each followed by a sigmoid that is broadcast with expand_as and then
    either gates the layer's output (x * s) or is the next layer's input."""

    def __init__(self, gate=True, shift=False):
        super().__init__()
        self.gate = gate
        self.shift = shift  # the sigmoid shifted and scaled by constants first: 2 * (s + eps)
        self.fc = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.score = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for fc, score in zip(self.fc, self.score):
            x = torch.relu(fc(x))
            s = torch.sigmoid(score(x))
            if self.shift:
                s = 2 * (s + 1e-6)
            s = s.expand_as(x)
            x = x * s if self.gate else s
        return self.head(x)
'''


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("gate", [True, False])
def test_nd102_follows_a_gate_through_expand_as(tmp_path, gate, shift):
    found = rules_found(tmp_path, GATES, "Net", {"gate": gate, "shift": shift}, shape=(16,))
    assert ("ND102" in found) is not gate, found


# ------------------------------------------------------------------ ND103: in-place writes

WRITTEN_BIAS = '''
import torch
from torch import nn


class Scores(nn.Module):
    """Token scores plus a learned bias written into the first column in place; the block
    returns a tuple. `keep`: whether the written tensor is the one returned."""

    def __init__(self, keep=True):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.zeros(8))
        self.keep = keep

    def forward(self, x):
        if x.shape[1] != 5:  # control flow on a shape: fx cannot trace it
            raise ValueError("five tokens expected")
        scores = self.proj(x)
        target = scores if self.keep else scores.clone()
        target[:, 0] = target[:, 0] + self.bias
        return scores, x.shape[1]


class Net(nn.Module):
    def __init__(self, keep=True):
        super().__init__()
        self.scores = Scores(keep)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.scores(x)
        return self.head(y.mean(dim=1))
'''


@pytest.mark.parametrize("keep", [True, False])
def test_nd103_follows_an_indexed_assignment_in_the_recorded_forward(tmp_path, keep):
    found = rules_found(tmp_path, WRITTEN_BIAS, "Net", {"keep": keep}, shape=(5, 8))
    assert "ND001" in found  # the graph is the recorded forward
    assert ("ND103" in found) is not keep, found


# ------------------------------------------------------------------ ND106: clamped score maps

SCORE_MAP = '''
import torch
from torch import nn


class Net(nn.Module):
    """A conv, then a 1x1 conv to 10 class scores per position, a ReLU and a global pool, in the
    order `order` gives."""

    def __init__(self, order="relu_pool", pool="avg"):
        super().__init__()
        self.order = order
        self.pool = pool
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.score = nn.Conv2d(16, 10, 1)

    def pooled(self, x):
        if self.pool == "mean":
            return x.mean(dim=(2, 3))
        return nn.functional.adaptive_avg_pool2d(x, 1)

    def forward(self, x):
        s = self.score(self.body(x))
        if self.order == "relu_pool":
            return self.pooled(torch.relu(s)).flatten(1)
        return torch.relu(self.pooled(s).flatten(1))
'''


@pytest.mark.parametrize("pool", ["avg", "mean"])
@pytest.mark.parametrize("order, clamped", [("relu_pool", False), ("pool_relu", True)])
def test_nd106_a_clamped_score_map_pooled_into_logits(tmp_path, order, clamped, pool):
    found = rules_found(tmp_path, SCORE_MAP, "Net", {"order": order, "pool": pool})
    assert ("ND106" in found) is clamped, found


# --------------------------------------------------------------- ND107: deliberate factorizations

STEMS = """
import torch
import torch.nn.functional as F
from torch import nn


class Blur(nn.Module):
    def __init__(self, channels=8):
        super().__init__()
        self.register_buffer("kernel", torch.full((channels, 1, 3, 3), 1.0 / 9))
        self.channels = channels

    def forward(self, x):
        return F.conv2d(x, self.kernel, padding=1, groups=self.channels)


class Net(nn.Module):
    def __init__(self, kind="strided_stem"):
        super().__init__()
        self.kind = kind
        s1, s2 = {"one_strided": (2, 1), "second_strided": (1, 2), "stride1_stem": (1, 1)}.get(
            kind, (2, 2)
        )
        if kind.startswith("blur"):
            s1, s2 = 1, 1
        self.pre = nn.Conv2d(3, 3, 3, padding=1) if kind == "strided_deep" else None
        self.conv1 = nn.Conv2d(3, 8, 3, stride=s1, padding=1)
        self.blur = Blur(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=s2, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        if self.kind == "strided_deep":  # the same pair after a layer and an activation
            x = torch.relu(self.pre(x))
        x = self.conv1(x)
        if self.kind == "blur_between":
            x = self.blur(x)
        elif self.kind == "blur_after_act":
            x = self.blur(torch.relu(x))
        x = torch.relu(self.norm(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))
"""


@pytest.mark.parametrize(
    "kind, collapse",
    [
        ("strided_stem", False),
        ("blur_after_act", False),
        ("one_strided", False),  # a 3x3/2 then a 3x3: one 5x5/2 patch embedding in two steps
        ("second_strided", False),
        ("stride1_stem", True),  # no downsampling: an ordinary first pair of layers
        ("strided_deep", True),
        ("blur_between", True),
    ],
)
def test_nd107_deliberate_factorizations(tmp_path, kind, collapse):
    found = rules_found(tmp_path, STEMS, "Net", {"kind": kind})
    assert ("ND107" in found) is collapse, found


TRANSFORMS = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A fixed orthogonal transform (a buffer) applied along rows then columns of each 16x16
    channel, between two learned layers: a 1x1 conv before it and a Linear after it."""

    def __init__(self, act=True):
        super().__init__()
        self.act = act
        self.register_buffer("basis", torch.linalg.qr(torch.randn(16, 16))[0])
        self.mix = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x):
        x = self.mix(x)
        if self.act:
            x = torch.relu(x)
        x = F.linear(F.linear(x, self.basis).transpose(-1, -2), self.basis).transpose(-1, -2)
        return self.head(torch.relu(self.fc(x)).flatten(1))
'''


@pytest.mark.parametrize("act", [True, False])
def test_nd107_a_fixed_transform_is_no_layer_but_no_activation_either(tmp_path, act):
    from netdoctor.loading.target import load

    path = tmp_path / "model.py"
    path.write_text(TRANSFORMS, encoding="utf-8")
    with chdir(REPO):
        loaded = load(f"{path}:Net", {"act": act}).models[0]
        report = check_loaded(loaded, CheckOptions(input_shape=IMAGE))
    pairs = [
        (f.evidence["first"], f.evidence["second"]) for f in report.findings if f.rule == "ND107"
    ]
    assert pairs == ([] if act else [("mix", "fc")]), pairs


# ------------------------------------------------- ND108: cuts that lose no gradient

SELECTED_KEYS = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Attention over 8 tokens whose keys are picked by an indexer run without grad. `use`:
    how the indexer's result enters the attention: as a mask of the top-k keys (integers and
    booleans: no gradient either way), or as a bias added to the scores (a float the no_grad
    cuts off)."""

    def __init__(self, use="mask", untraceable=False):
        super().__init__()
        self.use, self.untraceable = use, untraceable
        self.qkv = nn.Linear(16, 48)
        self.index = nn.Linear(16, 4)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        if self.untraceable and x.shape[-1] != 16:
            raise ValueError("16 features expected")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2)
        with torch.no_grad():
            i = self.index(x)
            relevance = i @ i.transpose(1, 2)
            if self.use == "mask":
                best = relevance.topk(4, dim=-1).indices
                keep = torch.zeros_like(relevance, dtype=torch.bool).scatter(-1, best, True)
        if self.use == "mask":
            scores = scores.masked_fill(~keep, float("-inf"))
        else:
            scores = scores + relevance
        return self.head((scores.softmax(dim=-1) @ v).mean(dim=1))
'''


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("use, cut", [("mask", False), ("bias", True)])
def test_nd108_a_cut_before_integer_values_loses_no_gradient(tmp_path, use, cut, untraceable):
    kwargs = {"use": use, "untraceable": untraceable}
    found = rules_found(tmp_path, SELECTED_KEYS, "Net", kwargs, shape=(8, 16))
    assert ("ND001" in found) is untraceable
    assert ("ND108" in found) is cut, found


CUSTOM_FUNCTION = '''
import torch
from torch import nn


class Gate(torch.autograd.Function):
    """silu(a) * b with a hand-written backward."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * torch.sigmoid(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        s = torch.sigmoid(a)
        return grad * b * (s + a * s * (1 - s)), grad * a * s


class Net(nn.Module):
    """A gated MLP whose gate is a custom autograd.Function. `cut`: where a gradient is lost
    anyway: nowhere, the Function's output detached, or its inputs computed under no_grad."""

    def __init__(self, cut="none", untraceable=False):
        super().__init__()
        self.cut, self.untraceable = cut, untraceable
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        if self.untraceable and x.shape[-1] != 16:
            raise ValueError("16 features expected")
        with torch.set_grad_enabled(self.cut != "inputs"):
            a, b = self.a(x), self.b(x)
        y = Gate.apply(a, b)
        if self.cut == "output":
            y = y.detach()
        return self.head(y)
'''


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("cut", ["none", "output", "inputs"])
def test_nd108_a_custom_autograd_function_passes_the_gradient(tmp_path, cut, untraceable):
    kwargs = {"cut": cut, "untraceable": untraceable}
    found = rules_found(tmp_path, CUSTOM_FUNCTION, "Net", kwargs, shape=(16,))
    assert ("ND001" in found) is untraceable
    assert ("ND108" in found) is (cut != "none"), found


# ---------------------------------------------- ND103: an extra output the caller ignores

TWO_OUTPUTS = '''
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, returns="both"):
        super().__init__()
        self.returns = returns
        self.body = nn.Linear(16, 16)
        self.pooler = nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[-1] != 16:
            raise ValueError("16 features expected")
        sequence = torch.relu(self.body(x))
        pooled = torch.tanh(self.pooler(sequence[:, 0]))
        return (sequence, pooled) if self.returns == "both" else sequence


class Net(nn.Module):
    """`returns="both"`: the encoder returns its pooled output too, which this head ignores;
    `"sequence"`: the encoder computes the pooled output and drops it (a dead branch)."""

    def __init__(self, returns="both"):
        super().__init__()
        self.returns = returns
        self.encoder = Encoder(returns)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        out = self.encoder(x)
        sequence = out[0] if self.returns == "both" else out
        return self.head(sequence[:, 0])
'''


@pytest.mark.parametrize("returns, severity", [("both", "INFO"), ("sequence", "WARNING")])
def test_nd103_an_extra_output_the_caller_ignores_is_info(tmp_path, returns, severity):
    from netdoctor.loading.target import load

    path = tmp_path / "model.py"
    path.write_text(TWO_OUTPUTS, encoding="utf-8")
    with chdir(REPO):
        loaded = load(f"{path}:Net", {"returns": returns}).models[0]
        report = check_loaded(loaded, CheckOptions(input_shape=(8, 16)))
    (f,) = [f for f in report.findings if f.rule == "ND103"]
    assert f.module == "encoder.pooler" and f.severity.name == severity


GROUPED = '''
import torch
from torch import nn


class GroupedLinear(nn.Linear):
    """Maps each of `groups` slices of its input with its own block of the weight."""

    def __init__(self, in_per_group, out_features, groups):
        super().__init__(in_per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x):
        w = self.weight.view(self.groups, -1, self.in_features).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, self.groups, self.in_features).transpose(0, 1), w)
        return y.transpose(0, 1).reshape(*x.shape[:-1], -1)


class Net(nn.Module):
    """Four groups of 8 features projected group by group (or densely), then mixed by a Linear."""

    def __init__(self, grouped=True):
        super().__init__()
        self.grouped = grouped
        self.first = GroupedLinear(8, 16, 4) if grouped else nn.Linear(32, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        if self.grouped:
            h = self.first(x.view(-1, 4, 8)).flatten(1)
        else:
            h = self.first(x)
        return self.head(torch.relu(self.mix(h)))
'''


@pytest.mark.parametrize("grouped", [True, False])
def test_nd107_a_grouped_projection_before_a_mixing_one(tmp_path, grouped):
    found = rules_found(tmp_path, GROUPED, "Net", {"grouped": grouped}, shape=(32,))
    assert ("ND107" in found) is not grouped, found


LOW_RANK = '''
import torch
from torch import nn


class Net(nn.Module):
    """A Linear with a factorized update beside it on the same input (LoRA-style: W x + B(A x)),
    or the same two factors stacked on the Linear's output instead."""

    def __init__(self, update=True):
        super().__init__()
        self.update = update
        self.main = nn.Linear(16, 32)
        self.down = nn.Linear(16, 24, bias=False)
        self.up = nn.Linear(24, 32, bias=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        if self.update:
            h = self.main(x) + self.up(self.down(x))
        else:
            h = self.up(self.down(torch.relu(self.main(x)).narrow(-1, 0, 16)))
        return self.head(torch.relu(h))
'''


@pytest.mark.parametrize("update", [True, False])
def test_nd107_a_factorized_update_beside_a_layer(tmp_path, update):
    found = rules_found(tmp_path, LOW_RANK, "Net", {"update": update}, shape=(16,))
    assert ("ND107" in found) is not update, found


# ------------------------------------------------- ND102: soft-capping is no saturating chain


@pytest.mark.parametrize("capped", [True, False])
def test_nd102_a_soft_cap_is_no_saturating_activation(tmp_path, capped):
    """cap * tanh(x / cap) around attention scores and logits (Gemma 2) is left alone; the same
    tanh without the division and the scaling is a saturating chain."""
    source = (REPO / "fixtures" / "healthy" / "soft_capped_attention.py").read_text()
    if not capped:
        source = source.replace(
            "self.score_cap * torch.tanh(scores / self.score_cap)", "torch.tanh(scores)"
        ).replace("self.logit_cap * torch.tanh(logits / self.logit_cap)", "torch.tanh(logits)")
    found = rules_found(tmp_path, source, "SoftCappedLM", {}, shape=(16,))
    assert ("ND102" in found) is not capped, found


# ------------------------------------------ ND201: normalizations the graph sees as no norm op

NORMALIZED_SCALES = '''
import torch
from torch import nn


class OwnRMSNorm(nn.Module):
    """A normalization module of the model's own: one opaque call in a recorded forward."""

    def __init__(self, dim, gain=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), gain))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Project(nn.Module):
    """A projection, then a LayerNorm written out in tensor ops (`written`), an own norm module
    (`own`) or nothing."""

    def __init__(self, d_in, dim, norm, gain=1.0, std=None):
        super().__init__()
        self.norm = norm
        self.dense = nn.Linear(d_in, dim)
        if std is not None:
            nn.init.normal_(self.dense.weight, std=std)
        self.own = OwnRMSNorm(dim, gain)
        self.weight = nn.Parameter(torch.full((dim,), gain))

    def forward(self, x):
        y = self.dense(x)
        if self.norm == "written":
            centered = y - y.mean(-1, keepdim=True)
            y = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-12)
            return y * self.weight
        return self.own(y) if self.norm == "own" else y


class Net(nn.Module):
    """`head`: a projection (normalized or not) -> a two-layer head at N(0, 0.02), 39x below
    LeCun in series. Else: a wide projection 4.5x above LeCun (normalized or not) -> an output
    layer. `untraceable`: control flow on a tensor value, so the graph is a recorded forward."""

    def __init__(self, head=True, norm="written", gain=1.0, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.head = head
        if head:
            self.body = Project(16, 64, norm, gain)
            self.dense, self.out = nn.Linear(64, 64), nn.Linear(64, 10)
            for m in (self.dense, self.out):
                nn.init.normal_(m.weight, std=0.02)
        else:
            self.up = nn.Linear(16, 8192)
            self.body = Project(8192, 64, norm, gain, std=0.05)
            self.out = nn.Linear(64, 10)

    def forward(self, x):
        if self.untraceable and x.abs().max() > 1e6:
            raise ValueError("input out of range")
        if self.head:
            return self.out(torch.tanh(self.dense(self.body(x))))
        return self.out(self.body(torch.relu(self.up(x))))
'''


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize(
    "head, norm, gain, reported",
    [
        (True, "written", 1.0, False),  # a small head after a LayerNorm written out
        (True, "own", 1.0, False),  # ... after a normalization module of the model's own
        (True, "written", 0.01, True),  # the written-out norm's gain far below 1: no unit scale
        (True, "none", 1.0, True),  # no normalization: 39x from the input
        (False, "written", 1.0, False),  # a large layer normalized right after
        (False, "own", 1.0, False),
        (False, "none", 1.0, True),  # a large layer whose scale goes on to the output
    ],
)
def test_nd201_sees_a_normalization_the_graph_has_no_norm_op_for(
    tmp_path, head, norm, gain, reported, untraceable
):
    kwargs = {"head": head, "norm": norm, "gain": gain, "untraceable": untraceable}
    found = rules_found(tmp_path, NORMALIZED_SCALES, "Net", kwargs, shape=(16,))
    assert ("ND001" in found) is untraceable
    assert ("ND201" in found) is reported, found


# ---------------------------------------------- ND103: a use this input cuts to nothing

WINDOWED = '''
import torch
from torch import nn


class Net(nn.Module):
    """Pools every `rate` tokens with softmax weights from a gate; a sequence shorter than the
    window has no complete window. `use="window"`: the gate feeds the pooling of complete windows
    (empty here); `"dropped"`: the gate is computed and dropped; `"tail"`: only the gate's
    incomplete tail is kept, and then dropped."""

    def __init__(self, rate=32, use="window"):
        super().__init__()
        self.rate, self.use = rate, use
        self.value = nn.Linear(16, 16)
        self.gate = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        b, t, d = x.shape
        usable = t // self.rate * self.rate
        values = self.value(x)
        gates = self.gate(x)
        if self.use == "window":
            gates = gates[:, :usable]
        elif self.use == "tail":
            gates = gates[:, usable:]
        if usable:
            n = usable // self.rate
            w = gates.reshape(b, n, self.rate, d).softmax(2)
            pooled = (values[:, :usable].reshape(b, n, self.rate, d) * w).sum(2)
            values = torch.cat([values, pooled], dim=1)
        return self.head(values.mean(1))
'''


@pytest.mark.parametrize(
    "use, severity", [("window", "INFO"), ("dropped", "WARNING"), ("tail", "WARNING")]
)
def test_nd103_a_result_this_input_cuts_to_an_empty_slice_is_info(tmp_path, use, severity):
    from netdoctor.loading.target import load

    path = tmp_path / "model.py"
    path.write_text(WINDOWED, encoding="utf-8")
    with chdir(REPO):
        loaded = load(f"{path}:Net", {"use": use}).models[0]
        report = check_loaded(loaded, CheckOptions(input_shape=(8, 16)))
    (f,) = [f for f in report.findings if f.rule == "ND103"]
    assert f.module == "gate" and f.severity.name == severity


# ------------------------------------------------- ND107: a block shared through tied weights


@pytest.mark.parametrize("tie", [True, False])
def test_nd107_a_layer_with_tied_weights_is_no_free_factorization(tmp_path, tie):
    """A shared block's last layer followed by a layer's own projection is left alone when the
    block's parameters are tied across layers; the same untied pair is a collapse."""
    source = (REPO / "fixtures" / "healthy" / "tied_shared_block.py").read_text()
    found = rules_found(tmp_path, source, "TiedHybridNet", {"tie": tie}, shape=(16,))
    assert ("ND107" in found) is not tie, found
