"""Maps PyTorch modules and functions onto the IR's normalized op kinds.

Shared by the fx frontend and the hook fallback so both produce the same IR.
"""

from __future__ import annotations

import inspect
import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from netdoctor.graph.ir import ParamInfo

_MODULE_OPS: list[tuple[tuple[type, ...], str]] = [
    (
        (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
            nn.LazyConv1d,
            nn.LazyConv2d,
            nn.LazyConv3d,
        ),
        "conv",
    ),
    ((nn.Linear, nn.LazyLinear, nn.Bilinear), "linear"),
    (
        (
            nn.BatchNorm1d,
            nn.BatchNorm2d,
            nn.BatchNorm3d,
            nn.SyncBatchNorm,
            nn.LazyBatchNorm1d,
            nn.LazyBatchNorm2d,
            nn.LazyBatchNorm3d,
        ),
        "batchnorm",
    ),
    ((nn.LayerNorm,), "layernorm"),
    ((nn.GroupNorm,), "groupnorm"),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), "instancenorm"),
    ((nn.LocalResponseNorm,), "lrn"),
    ((nn.ReLU,), "relu"),
    ((nn.ReLU6,), "relu6"),
    ((nn.LeakyReLU,), "leaky_relu"),
    ((nn.PReLU,), "prelu"),
    ((nn.RReLU,), "rrelu"),
    ((nn.ELU,), "elu"),
    ((nn.SELU,), "selu"),
    ((nn.CELU,), "celu"),
    ((nn.GELU,), "gelu"),
    ((nn.SiLU,), "silu"),
    ((nn.Mish,), "mish"),
    ((nn.Hardswish,), "hardswish"),
    ((nn.Hardsigmoid,), "hardsigmoid"),
    ((nn.Hardtanh,), "hardtanh"),
    ((nn.Softplus,), "softplus"),
    ((nn.Sigmoid,), "sigmoid"),
    ((nn.Tanh,), "tanh"),
    ((nn.Softmax, nn.Softmax2d), "softmax"),
    ((nn.LogSoftmax,), "log_softmax"),
    (
        (
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        ),
        "maxpool",
    ),
    (
        (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
        ),
        "avgpool",
    ),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), "dropout"),
    ((nn.Flatten, nn.Unflatten), "reshape"),
    ((nn.Identity,), "identity"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding"),
    ((nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell), "rnn"),
    ((nn.MultiheadAttention,), "attention"),
    ((nn.Upsample,), "upsample"),
]

# Containers that are transparent: fx traces through them and hooks look inside them.
TRANSPARENT = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Whole-module ops whose internals we do not look into (their insides are not chains/stacks).
OPAQUE_LEAVES = (
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)

_FUNC_NAMES: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "leaky_relu_": "leaky_relu",
    "elu": "elu",
    "elu_": "elu",
    "selu": "selu",
    "celu": "celu",
    "prelu": "prelu",
    "rrelu": "rrelu",
    "gelu": "gelu",
    "silu": "silu",
    "mish": "mish",
    "hardswish": "hardswish",
    "hardsigmoid": "hardsigmoid",
    "hardtanh": "hardtanh",
    "softplus": "softplus",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "max_pool1d": "maxpool",
    "max_pool2d": "maxpool",
    "max_pool3d": "maxpool",
    "adaptive_max_pool1d": "maxpool",
    "adaptive_max_pool2d": "maxpool",
    "avg_pool1d": "avgpool",
    "avg_pool2d": "avgpool",
    "avg_pool3d": "avgpool",
    "adaptive_avg_pool1d": "avgpool",
    "adaptive_avg_pool2d": "avgpool",
    "mean": "mean",
    "dropout": "dropout",
    "dropout1d": "dropout",
    "dropout2d": "dropout",
    "dropout3d": "dropout",
    "add": "add",
    "add_": "add",
    "iadd": "add",
    "__add__": "add",
    "__radd__": "add",
    "__iadd__": "add",
    "sub": "sub",
    "__sub__": "sub",
    "__rsub__": "sub",
    "isub": "sub",
    "addcmul": "add",
    "addcmul_": "add",
    "addcdiv": "add",
    "lerp": "add",
    "lerp_": "add",
    "mul": "mul",
    "mul_": "mul",
    "__mul__": "mul",
    "__rmul__": "mul",
    "imul": "mul",
    "__imul__": "mul",
    "truediv": "div",
    "div": "div",
    "__truediv__": "div",
    "__rtruediv__": "div",
    "matmul": "matmul",
    "__matmul__": "matmul",
    "bmm": "matmul",
    "mm": "matmul",
    "einsum": "matmul",
    "baddbmm": "matmul",
    "scaled_dot_product_attention": "attention",
    "cat": "cat",
    "concat": "cat",
    "concatenate": "cat",
    "stack": "cat",
    "flatten": "reshape",
    "view": "reshape",
    "reshape": "reshape",
    "permute": "reshape",
    "transpose": "reshape",
    "unsqueeze": "reshape",
    "squeeze": "reshape",
    "contiguous": "reshape",
    "expand": "reshape",
    "expand_as": "reshape",
    "broadcast_to": "reshape",
    "view_as": "reshape",
    "reshape_as": "reshape",
    "chunk": "split",
    "split": "split",
    "getitem": "getitem",
    "__getitem__": "getitem",
    "setitem": "setitem",
    "__setitem__": "setitem",
    "size": "size",
    "dim": "size",
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "linear": "linear",
    "batch_norm": "batchnorm",
    "layer_norm": "layernorm",
    "group_norm": "groupnorm",
    "instance_norm": "instancenorm",
    "rms_norm": "rmsnorm",
    "detach": "detach",
    "detach_": "detach",
    "numpy": "detach",
    "item": "detach",
    "tolist": "detach",
    "neg": "neg",
    "__neg__": "neg",
    "exp": "exp",
    "log": "log",
    "sqrt": "sqrt",
    "pow": "pow",
    "__pow__": "pow",
    "clamp": "clamp",
    "abs": "abs",
    "interpolate": "upsample",
    "pad": "pad",
    "embedding": "embedding",
    "sum": "sum",
    "normalize": "l2norm",
}


def module_op(module: nn.Module) -> str:
    """The normalized op kind of a module call ("module" for user-defined modules)."""
    for types, op in _MODULE_OPS:
        if isinstance(module, types):
            return op
    return "module"


def function_op(target: Any) -> str:
    """The normalized op kind of a function or method call (fx targets, torch functions)."""
    if isinstance(target, str):
        name = target
    else:
        name = getattr(target, "__name__", None) or str(target)
    if target in (operator.add, operator.iadd):
        return "add"
    if target in (operator.mul, operator.imul):
        return "mul"
    if target is operator.getitem:
        return "getitem"
    return _FUNC_NAMES.get(name, name)


# Where torch's own (C++) normalization and conv/linear functions take their weight and bias,
# by position (no Python signature to bind): torch.batch_norm(input, weight, bias, running_mean,
# ...) differs from F.batch_norm(input, running_mean, running_var, weight, bias, ...).
_BUILTIN_WEIGHT_ARGS = {
    "conv1d": (1, 2),
    "conv2d": (1, 2),
    "conv3d": (1, 2),
    "linear": (1, 2),
    "batch_norm": (1, 2),
    "instance_norm": (1, 2),
    "layer_norm": (2, 3),
    "group_norm": (2, 3),
    "rms_norm": (2, None),
}


def weight_arguments(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The values a functional conv/linear or normalization call takes as its `weight` and `bias`
    (those given: a role left out or passed as None is absent), {} when the call cannot be read.
    """
    try:
        named = dict(inspect.signature(target).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        positions = _BUILTIN_WEIGHT_ARGS.get(getattr(target, "__name__", ""))
        if positions is None:
            return {}
        named = dict(kwargs)
        for role, i in zip(("weight", "bias"), positions):
            if i is not None and i < len(args):
                named[role] = args[i]
    return {role: named[role] for role in ("weight", "bias") if named.get(role) is not None}


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if mod.startswith("torch._C") or mod == "builtins":
        mod = "torch"
    return f"{mod}.{name}" if mod else name


_CONSTRUCTOR_FACTS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "momentum",
    "eps",
    "affine",
    "track_running_stats",
    "p",
    "inplace",
    "dim",
    "negative_slope",
    "num_embeddings",
    "embedding_dim",
    "normalized_shape",
    "num_groups",
    "min_val",
    "max_val",
)


def module_attrs(module: nn.Module) -> dict[str, Any]:
    """The constructor facts rules need (channels, kernel, momentum, groups, ...)."""
    attrs: dict[str, Any] = {"type": type(module).__name__}
    own = vars(module)
    for key in _CONSTRUCTOR_FACTS:
        if key in own:
            value = own[key]
        elif hasattr(type(module), key):  # a class attribute or a property
            value = getattr(module, key)
        else:  # (asking the module itself would raise and catch an AttributeError per name)
            continue
        if isinstance(value, (int, float, bool, str, tuple, type(None))):
            attrs[key] = value
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        attrs["has_bias"] = module.bias is not None
    return attrs


def param_info(tensor: torch.Tensor) -> ParamInfo:
    from netdoctor.graph.ir import ParamInfo

    with torch.no_grad():
        if isinstance(tensor, nn.parameter.UninitializedParameter):
            return ParamInfo(
                shape=(),
                numel=0,
                mean=0.0,
                std=0.0,
                all_equal=False,
                trainable=tensor.requires_grad,
            )
        if tensor.is_meta:  # a model too large to build: its construction says
            from netdoctor.loading.deferred import stats_of

            known = stats_of(tensor)
            if known is not None:
                return ParamInfo(
                    tuple(tensor.shape),
                    known.numel,
                    known.mean,
                    known.std,
                    known.all_equal,
                    tensor.requires_grad,
                )
        t = tensor.detach().float()
        numel = t.numel()
        if numel == 0:
            return ParamInfo(tuple(t.shape), 0, 0.0, 0.0, False, tensor.requires_grad)
        flat = t.reshape(-1)
        mean = float(flat.mean())
        std = float(flat.std()) if numel > 1 else 0.0
        if numel > 1:  # min == max: one cheap pass (a NaN makes both NaN, hence unequal)
            low, high = torch.aminmax(flat)
            all_equal = bool(low == high)
        else:
            all_equal = False
    return ParamInfo(tuple(t.shape), numel, mean, std, all_equal, tensor.requires_grad)


def module_params(module: nn.Module) -> dict:
    """Summaries of a module's own (non-recursive) parameters."""
    return {name: param_info(p) for name, p in module.named_parameters(recurse=False)}
