"""False alarms on library models: `netdoctor check` on every architecture of timm, torchvision and
transformers, each built by its library's own factory with the library's own initialisation.

    python benchmarks/zoo_sweep.py --workers 2 --json zoo.json       # all three, ~20 min on 2 cores
    python benchmarks/zoo_sweep.py --library timm --sample 30 --seed 1
    python benchmarks/zoo_sweep.py --only resnet18 LlamaForCausalLM
    python benchmarks/zoo_sweep.py --compare before.json after.json
    python benchmarks/zoo_sweep.py --library transformers --deferred   # on the meta device
    python benchmarks/zoo_sweep.py --summary zoo.json --markdown      # the tables of a saved run

Not CI: it needs timm, torchvision and transformers, which CI does not install. Build its side
environment with benchmarks/zoo_env.sh (torch, torchvision, timm, transformers, accelerate and
netdoctor's runtime dependencies); this script imports this checkout's src/.

A model that trains as its library builds it is healthy, so every warning or error `netdoctor
check` reports on it is a false alarm (a CI gate that fails on a healthy model gets switched off).
Each model is built under netdoctor's seed (`netdoctor check`'s default, --model-seed) with the
library's default initialisation, with pretrained=False / weights=None (no download), and checked
through the Python API exactly as `netdoctor check` checks a loaded model:
`netdoctor.check.check_loaded(LoadedModel(...), CheckOptions(input_shape=..., input_dtype=...))`,
default rule settings.

  * timm: every `timm.list_models()` architecture with at most --max-params parameters (counted
    on the meta device first, so a large model is never built for real), at its own
    pretrained_cfg input size.
  * torchvision: every classification model (`list_models(module=torchvision.models)`; 3x224x224,
    inception_v3 3x299x299) and every segmentation model (3x224x224, --seg-size; backbone
    weights=None too); no size limit.
  * transformers: every model type of MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, from a shrunk config (AutoConfig.for_model with 2 layers,
    width 64, 2 heads, intermediate 128, vocabulary 1000, 128 positions, 4 experts: whichever of
    these attributes the config has, nested configs too; an absolute init std, such as
    initializer_range, times sqrt(real width / 64), so that the init keeps its scale relative to
    the width), built with AutoModelFor...from_config;
    token input (long) of length 32. Named by the built class (LlamaForCausalLM).

Each model's verdict: clean (no finding at warning or error; info findings are allowed),
confirmed (every warning is a dead-submodule finding that one backward from the model's output
confirms: those parameters get no gradient on this machine, a true finding, not a false alarm),
warnings (the worst is a warning), errors (an error: `netdoctor check` exits 1), crash (netdoctor
raised: a netdoctor bug), timeout (the check ran past --timeout), or skipped: size (above
--max-params), build failed (the library could not build it here, or the build ran past
--timeout), input rejected (netdoctor's ND002 says the forward failed and a plain forward of the
same input, without netdoctor, fails too: the model needs other inputs). Clean % is clean over
the checked models (clean + warnings + errors + crashes + timeouts), confirmed ones left out.

Every model runs in a worker process (--workers, one torch thread each) with a time limit
(--timeout, build and check together): a hang is killed and the worker replaced, a worker that
dies (a segfault, out of memory) is a crash row. Workers are replaced every --recycle models and
when their memory grows past --max-rss-gb. Rows are appended to OUT.partial.jsonl while the sweep
runs (--resume skips the models already there), and --json OUT holds every model's findings
(rule, severity, module, message, location) and notes for diffing; --compare prints the
before/after tables of two such files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("timm", "torchvision", "transformers")
CHECKED = ("clean", "confirmed", "warnings", "errors", "crash", "timeout")
# Warnings of these rules claim that some parameters never get a gradient: one backward measures it
MEASURABLE = {"ND103"}
SEQ_LEN = 32
TORCHVISION_SIZES = {"inception_v3": 299}
SEVERITY_ORDER = {"info": 1, "warning": 2, "error": 3}


# ------------------------------------------------------------------------------ the models


def list_models(library: str) -> list[dict[str, Any]]:
    """Every model of a library as a task: {"library", "name", and how to build it}."""
    if library == "timm":
        import timm

        return [{"library": "timm", "name": n} for n in timm.list_models()]
    if library == "torchvision":
        import torchvision.models as tvm

        tasks = [
            {"library": "torchvision", "name": n, "kind": "classification"}
            for n in tvm.list_models(module=tvm)
        ]
        tasks += [
            {"library": "torchvision", "name": n, "kind": "segmentation"}
            for n in tvm.list_models(module=tvm.segmentation)
        ]
        return tasks
    if library == "transformers":
        from transformers.models.auto import modeling_auto as ma

        tasks = []
        for head, mapping in (
            ("sequence-classification", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
            ("causal-lm", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ):
            # One row per class: several model types build the same one (exaone, internlm3
            # and llama build LlamaForCausalLM); the type the class is named after builds it.
            by_class: dict[str, list[str]] = {}
            for model_type, cls_name in mapping.items():
                if isinstance(cls_name, (list, tuple)):
                    cls_name = cls_name[0]
                by_class.setdefault(cls_name, []).append(model_type)
            for cls_name, types in by_class.items():
                named = [t for t in types if cls_name.lower().startswith(_plain(t))]
                model_type = min(named or types, key=len)
                task = {"library": "transformers", "name": cls_name, "model_type": model_type}
                task["head"] = head
                if len(types) > 1:
                    task["also"] = [t for t in types if t != model_type]
                tasks.append(task)
        return tasks
    raise ValueError(f"unknown library {library!r}")


def _plain(model_type: str) -> str:
    return model_type.replace("-", "").replace("_", "").lower()


class Skip(Exception):
    """The model is not checked: `kind` is size, build failed or input rejected."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_size(task: dict[str, Any], max_params: float) -> int | None:
    """The parameter count of a timm model, from a build on the meta device (no memory, no
    init), so that a model above max_params is never built for real; None when the model cannot
    be built on meta."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            meta = timm.create_model(task["name"], pretrained=False)
    except Exception:
        return None
    n = param_count(meta)
    del meta
    if n > max_params:
        raise Skip("size", f"{n / 1e6:.1f}M parameters > {max_params / 1e6:g}M")
    return n


def build_timm(task: dict[str, Any]):
    """The model, its input shape and dtype (its pretrained_cfg's input size)."""
    import timm

    model = timm.create_model(task["name"], pretrained=False)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shape = tuple(cfg.get("input_size") or (3, 224, 224))
    return model, shape, "float32"


def build_torchvision(task: dict[str, Any], seg_size: int):
    import torchvision.models as tvm

    name = task["name"]
    if task.get("kind") == "segmentation":
        model = tvm.get_model(name, weights=None, weights_backbone=None)
        return model, (3, seg_size, seg_size), "float32"
    model = tvm.get_model(name, weights=None)
    side = TORCHVISION_SIZES.get(name, 224)
    return model, (3, side, side), "float32"


# The shrunk transformers config: every attribute of these names that the config has (nested
# configs too) is set to the value, through the config's constructor (so that what it derives
# from them follows). An attribute the config leaves None is set too (head_dim None is "width /
# heads"; some models' code divides by it), except the expert counts (None: no experts).
SHRINK: dict[int, tuple[str, ...]] = {
    64: (  # the width
        "hidden_size",
        "d_model",
        "n_embd",
        "dim",
        "embed_dim",
        "emb_dim",
        "word_embed_proj_dim",
        "embedding_size",
        "entity_emb_size",
        "d_embed",
        "d_latents",
        "lru_width",
    ),
    2: (  # layers and heads
        "num_hidden_layers",
        "n_layer",
        "n_layers",
        "num_layers",
        "encoder_layers",
        "decoder_layers",
        "num_decoder_layers",
        "num_attention_heads",
        "n_head",
        "n_heads",
        "num_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "num_key_value_heads",
        "n_kv_heads",
        "num_kv_heads",
        "multi_query_group_num",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_num_heads",
        "num_experts_per_tok",
        "num_experts_per_token",
        "moe_topk",
        "moe_k",
        "index_n_heads",
        "full_attention_interval",
    ),
    128: (  # the feed-forward width and the positions
        "intermediate_size",
        "ffn_dim",
        "n_inner",
        "d_ff",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "ffn_hidden_size",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "shared_intermediate_size",
        "attention_hidden_size",
        "max_position_embeddings",
        "n_positions",
        "n_ctx",
        "seq_length",
    ),
    32: (  # width / heads
        "head_dim",
        "d_kv",
        "kv_channels",
        "attention_head_size",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_head_dim",
        "v_head_dim",
        "index_head_dim",
        "num_latents",
    ),
    16: ("rotary_dim", "index_topk"),
    4: ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    1000: ("vocab_size", "entity_vocab_size"),
    1: (
        "n_shared_experts",
        "num_shared_experts",
        "moe_num_shared_experts",
        "n_group",
        "num_expert_group",
        "topk_group",
    ),
}
SHRINK_TO = {attr: value for value, attrs in SHRINK.items() for attr in attrs}
EXPERTS = (
    *SHRINK[4],
    *SHRINK[1],
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_k",
)
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
VOCAB = 1000
SHRINK_WIDTH = 64
INIT_STDS = ("initializer_range", "init_std")  # absolute init stds (T5's factor is relative)


def shrink_kwargs(config) -> dict[str, Any]:
    """Constructor arguments that shrink `config` (and its nested configs) to 2 layers of width
    64 (see SHRINK); per-layer lists keep one of each kind of layer (a hybrid keeps an
    attention layer), and two of a kind whose layers share a block (3 layers; see
    _listed_kind)."""
    from transformers import PretrainedConfig

    d = config.to_dict()
    out: dict[str, Any] = {}
    layers = next((d[k] for k in LAYERS if isinstance(d.get(k), int)), None)
    has_experts = any(isinstance(d.get(k), int) and d[k] > 0 for k in SHRINK[4])
    three_layers = False
    for attr, value in d.items():
        current = getattr(config, attr, value)
        if isinstance(current, PretrainedConfig):
            out[attr] = {**current.to_dict(), **shrink_kwargs(current)}
        elif attr in SHRINK_TO and isinstance(current, int) and not isinstance(current, bool):
            out[attr] = SHRINK_TO[attr]
        elif attr in SHRINK_TO and current is None and attr not in EXPERTS:
            out[attr] = SHRINK_TO[attr]
        elif isinstance(current, list) and current and attr != "architectures":
            if layers and len(current) == layers and layers > 2:  # one entry per layer
                out[attr] = _two_kinds(current, _listed_kind(d, current))
                three_layers = three_layers or len(out[attr]) == 3
            elif attr.endswith("types") and all(isinstance(v, str) for v in current):
                out[attr] = _two_kinds(current)  # a pattern of layer kinds (block_types)
    if three_layers:  # a kind of layer kept twice
        out.update({k: 3 for k in LAYERS if isinstance(d.get(k), int)})
    if has_experts and d.get("num_experts_per_tok", 0) is None:
        out["num_experts_per_tok"] = 2
    for attr in ("attn_layer_period", "expert_layer_period"):
        if isinstance(d.get(attr), int):
            out[attr] = 2
            out[attr.replace("period", "offset")] = 1
    if "attention_types" in d:  # GPT-Neo: [[["global", "local"], 12]] repeats a pattern
        out["attention_types"] = [[["global", "local"], 1]]
    if isinstance(d.get("qk_rope_head_dim"), int):  # multi-head latent attention
        rope, nope = d["qk_rope_head_dim"], d.get("qk_nope_head_dim") or 0
        out.update(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, kv_lora_rank=32)
        if d.get("q_lora_rank") is not None:
            out["q_lora_rank"] = 32
        if d.get("head_dim") == rope:
            out["head_dim"] = 16
        elif d.get("head_dim") == rope + nope:
            out["head_dim"] = 32
        if "qk_head_dim" in d:
            out["qk_head_dim"] = 32
    if isinstance(d.get("expand"), int) and "num_heads" in d and "head_dim" in d:  # Mamba-2
        out["head_dim"] = d["expand"] * 64 // 2
        if isinstance(d.get("n_groups"), int):
            out["n_groups"] = 1
    if "hidden_dim" in d and "dim" in d:  # DistilBERT: the FFN width
        out["hidden_dim"] = 128
    width = next((d[k] for k in SHRINK[64] if isinstance(d.get(k), int) and d[k] > 0), None)
    if width and width > SHRINK_WIDTH:
        # A fixed init std is tuned for the real width (BERT's 0.02 at 768 is 0.55x LeCun's
        # 1/sqrt(768)); at width 64 the same 0.02 is 6x below it, a model the library never
        # ships. The shrunk model keeps its init relative to its width: std * sqrt(width / 64).
        for attr in INIT_STDS:
            if isinstance(d.get(attr), float):
                out[attr] = d[attr] * math.sqrt(width / SHRINK_WIDTH)
        if isinstance(d.get("dim_model_base"), int):
            # A muP base width (MiniCPM3 divides the hidden state by width / base before its
            # tied output layer): the shrunk model keeps the ratio (to an integer's rounding),
            # or its logits grow 40x.
            out["dim_model_base"] = max(1, round(d["dim_model_base"] * SHRINK_WIDTH / width))
    if "vocab_size" in d:
        # Token ids must stay inside the shrunk vocabulary (padding_idx is checked at build);
        # a padding token lets the sequence classifiers take a batch of two.
        for attr, value in d.items():
            if not attr.endswith("_token_id"):
                continue
            if attr == "pad_token_id" and (value is None or _outside(value)):
                out[attr] = 0
            elif _outside(value):
                out[attr] = [2] * len(value) if isinstance(value, list) else 2
    return out


def _two_kinds(values: list[Any], twice: Any = None) -> list[Any]:
    """Two entries of a per-layer list: the first, and the first that differs from it; and the
    kind `twice` a second time when it is the second (see _listed_kind)."""
    first = values[0]
    kinds = [
        first,
        next((v for v in values[1:] if v != first), values[1] if len(values) > 1 else first),
    ]
    return kinds + [twice] if twice is not None and kinds[1] == twice != first else kinds


def _listed_kind(config: dict[str, Any], kinds: list[Any]) -> Any:
    """The kind of layer whose ids the config also lists (Zamba2's `hybrid_layer_ids`: the layers
    that call one shared block, each through its own per-layer modules), if any: a shrink keeps
    two such layers, so that the block is seen shared between them."""
    for attr, ids in config.items():
        if not (attr.endswith("_layer_ids") and isinstance(ids, list) and len(ids) > 1):
            continue
        if all(isinstance(i, int) and 0 <= i < len(kinds) for i in ids):
            listed = {kinds[i] for i in ids}
            if len(listed) == 1:
                return listed.pop()
    return None


def _outside(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, int) and v >= VOCAB for v in values)


def build_transformers(task: dict[str, Any]):
    """The shrunk model of the task's model type; when that type's config does not build the
    class, the other types that map to it are tried (`built_from` says which one did)."""
    import transformers
    from transformers import AutoConfig

    auto = (
        transformers.AutoModelForSequenceClassification
        if task["head"] == "sequence-classification"
        else transformers.AutoModelForCausalLM
    )
    first: BaseException | None = None
    for model_type in [task["model_type"], *task.get("also", [])]:
        try:
            base = AutoConfig.for_model(model_type)
            config = AutoConfig.for_model(model_type, **shrink_kwargs(base))
            model = auto.from_config(config)
        except Exception as e:
            first = first or e
            continue
        if model_type != task["model_type"]:
            task["built_from"] = model_type
        return model, (SEQ_LEN,), "long"
    assert first is not None
    raise first


# ------------------------------------------------------------------------------ one model


def _short(e: BaseException, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text[:limit]


def _where(path: str | None) -> str | None:
    """A location's path, relative to the checkout or to site-packages (diffable across
    machines)."""
    if not path:
        return path
    p = str(path)
    root = str(REPO) + os.sep
    if p.startswith(root):
        return p[len(root) :]
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in p:
            return p.split(marker, 1)[1]
    return p


def _located(location) -> str | None:
    if location is None:
        return None
    return _where(location.path) + (f":{location.line}" if location.line else "")


def finding_row(f) -> dict[str, Any]:
    loc = _located(f.location)
    return {
        "rule": f.rule,
        "name": f.name,
        "severity": f.severity.label,
        "module": f.module,
        "message": f.message,
        "location": loc,
        "library_location": _located(f.library_location),
    }


def plain_forward_error(model, shape: tuple[int, ...], dtype: str) -> str | None:
    """The model's own forward, without netdoctor's hooks or tracing, on the input netdoctor
    gives it (its example batch of two, token ids below the first layer's vocabulary), in eval
    mode without grad: None when it runs, else the error."""
    import torch

    from netdoctor.loading.forward import example_input
    from netdoctor.loading.shapes import first_layer

    found = first_layer(model)
    vocab = getattr(found[1], "num_embeddings", None) if found else None
    x = example_input(shape, dtype, batch=2, vocab=vocab)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as e:
        return _short(e)
    finally:
        model.train(was_training)
    return None


def no_gradient(model, shape: tuple[int, ...], dtype: str, modules: list[str], seed: int) -> bool:
    """Whether one backward from the model's output (its first tensor: logits) gives none of
    `modules`' parameters a nonzero gradient: a dead-submodule finding measured, not believed
    (a true finding on this machine, not a false alarm)."""
    import torch

    from netdoctor.loading.forward import example_input
    from netdoctor.loading.seeding import seeded
    from netdoctor.loading.shapes import first_layer

    found = first_layer(model)
    vocab = getattr(found[1], "num_embeddings", None) if found else None
    named = dict(model.named_modules())
    if any(m not in named for m in modules):
        return False
    try:
        with seeded(seed):
            x = example_input(shape, dtype, batch=2, vocab=vocab)
            model.train()
            model.zero_grad(set_to_none=True)
            out = model(x)
            if not isinstance(out, torch.Tensor):
                out = next(
                    v
                    for v in (out.values() if hasattr(out, "values") else out)
                    if isinstance(v, torch.Tensor)
                )
            out.float().sum().backward()
    except Exception:
        return False
    for m in modules:
        for p in named[m].parameters():
            if p.grad is not None and bool(p.grad.abs().sum() > 0):
                return False
    model.zero_grad(set_to_none=True)
    return True


def build_task(task: dict[str, Any], settings: dict[str, Any]):
    """(model, input shape, dtype, its Deferred record or None): built by its library, for
    real, or with --deferred on the meta device as `netdoctor check` builds a model too large to
    build (netdoctor.loading.deferred), its construction recorded."""

    def build():
        if task["library"] == "timm":
            return build_timm(task)
        if task["library"] == "torchvision":
            return build_torchvision(task, settings["seg_size"])
        return build_transformers(task)

    if not settings.get("deferred"):
        return (*build(), None)
    from netdoctor.loading.deferred import record

    built: list[tuple[Any, ...]] = []
    deferred = record(lambda: built.append(build()) or built[0][0])
    _, shape, dtype = built[0]
    return deferred.model, shape, dtype, deferred


def run_task(task: dict[str, Any], settings: dict[str, Any], phase) -> dict[str, Any]:
    """Build and check one model; never raises (the verdict is in the row)."""
    import gc

    from netdoctor.check import CheckOptions, check_loaded
    from netdoctor.loading.provenance import Provenance, class_location
    from netdoctor.loading.seeding import seeded
    from netdoctor.loading.target import LoadedModel

    row: dict[str, Any] = {k: v for k, v in task.items()}
    seed = settings["model_seed"]
    model = loaded = report = None
    try:
        __import__(task["library"])  # a worker's first model: the import is not its build time
    except Exception:
        pass  # the build says why
    t0 = time.perf_counter()
    try:
        phase("build")
        prov = Provenance()
        try:
            if task["library"] == "timm":
                timm_size(task, settings["max_params"])  # outside the seed: RNG as in a check
            with prov.recording(), seeded(seed):
                model, shape, dtype, deferred = build_task(task, settings)
        except Skip:
            raise
        except BaseException as e:  # a library raising anything, SystemExit included
            raise Skip("build failed", _short(e)) from None
        if "built_from" in task:
            row["built_from"] = task["built_from"]
        row["params"] = param_count(model)
        if task["library"] == "timm" and row["params"] > settings["max_params"]:
            limit = settings["max_params"]
            raise Skip("size", f"{row['params'] / 1e6:.1f}M parameters > {limit / 1e6:g}M")
        row["input_shape"], row["input_dtype"] = list(shape), dtype
        row["class"] = f"{type(model).__module__}.{type(model).__qualname__}"
        row["build_s"] = round(time.perf_counter() - t0, 3)

        phase("check")
        t1 = time.perf_counter()
        loaded = LoadedModel(
            f"{task['library']}:{task['name']}",
            model,
            prov,
            class_location(type(model)),
            deferred=deferred,
        )
        try:
            report = check_loaded(
                loaded, CheckOptions(input_shape=shape, input_dtype=dtype, seed=seed)
            )
        except Exception as e:
            row["status"] = "crash"
            row["error"] = {
                "type": type(e).__name__,
                "message": _short(e, 1000),
                "traceback": traceback.format_exc()[-4000:],
            }
            return row
        finally:
            row["check_s"] = round(time.perf_counter() - t1, 3)
        row["findings"] = [finding_row(f) for f in report.sorted_findings()]
        row["notes"] = [n[:300] for n in report.notes]
        worst = max((SEVERITY_ORDER[f["severity"]] for f in row["findings"]), default=0)
        row["status"] = {3: "errors", 2: "warnings"}.get(worst, "clean")
        flagged = [f for f in row["findings"] if SEVERITY_ORDER[f["severity"]] >= 2]
        if (
            flagged
            and deferred is None  # a model on the meta device cannot run a backward
            and {f["rule"] for f in flagged} <= MEASURABLE
            and all(f["module"] for f in flagged)
            and no_gradient(model, shape, dtype, [f["module"] for f in flagged], seed)
        ):
            row["status"] = "confirmed"
        if any(f["rule"] == "ND002" for f in row["findings"]):
            error = plain_forward_error(model, shape, dtype)
            if error is not None:
                raise Skip("input rejected", error)
    except Skip as s:
        row["status"], row["skip"], row["reason"] = "skipped", s.kind, s.reason
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 3)
        del model, loaded, report
        gc.collect()
    return row


# ------------------------------------------------------------------------------ the workers


def _rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return 0.0


def worker_main(conn, settings: dict[str, Any]) -> None:
    """A worker process: one task at a time from the pipe, ("phase", p) and ("row", row) back.
    Its stdout/stderr go to settings["log"] (libraries print and warn a lot)."""
    log = os.open(settings["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    torch.set_num_threads(settings["threads"])
    while True:
        task = conn.recv()
        if task is None:
            return
        print(f"--- {task['library']} {task['name']}", flush=True)
        row = run_task(task, settings, lambda p: conn.send(("phase", p)))
        row["rss_gb"] = round(_rss_gb(), 2)
        conn.send(("row", row))


class Worker:
    def __init__(self, ctx, settings: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, settings), daemon=True)
        self.proc.start()
        child.close()
        self.task: dict[str, Any] | None = None
        self.phase = "start"
        self.started = 0.0
        self.done = 0

    def send(self, task: dict[str, Any]) -> None:
        self.task, self.phase, self.started = task, "start", time.perf_counter()
        self.conn.send(task)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_tasks(tasks: list[dict[str, Any]], args, settings: dict[str, Any], on_row) -> None:
    """Run every task in --workers processes, each under the per-model time limit."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = list(reversed(tasks))
    workers: list[Worker | None] = [None] * max(1, args.workers)

    def finish(w: Worker, row: dict[str, Any]) -> None:
        w.task = None
        w.done += 1
        on_row(row)

    while pending or any(w is not None and w.task is not None for w in workers):
        for i, w in enumerate(workers):
            if pending and (w is None or w.task is None):
                if w is None:
                    w = workers[i] = Worker(ctx, settings)
                w.send(pending.pop())
        busy = [w for w in workers if w is not None and w.task is not None]
        now = time.perf_counter()
        wait_s = max(0.0, min(w.started + args.timeout - now for w in busy))
        ready = wait([w.conn for w in busy], timeout=wait_s + 0.05)
        for w in busy:
            assert w.task is not None
            task = w.task
            if w.conn in ready:
                try:
                    kind, payload = w.conn.recv()
                except (EOFError, OSError):
                    w.proc.join(5)
                    code = w.proc.exitcode
                    row = dict(task, seconds=round(time.perf_counter() - w.started, 3))
                    message = f"the worker process died (exit code {code}) in the {w.phase} phase"
                    if w.phase == "check":
                        row.update(status="crash", error={"type": "WorkerDied", "message": message})
                    else:
                        row.update(status="skipped", skip="build failed", reason=message)
                    w.stop(kill=True)
                    workers[workers.index(w)] = None
                    finish(w, row)
                    continue
                if kind == "phase":
                    w.phase = payload
                    continue
                finish(w, payload)
                if w.done >= args.recycle or payload.get("rss_gb", 0) > args.max_rss_gb:
                    w.stop()
                    workers[workers.index(w)] = None
            elif time.perf_counter() - w.started > args.timeout:
                row = dict(task, seconds=round(time.perf_counter() - w.started, 3))
                message = f"no result after {args.timeout:g} s (in the {w.phase} phase)"
                if w.phase == "check":
                    row.update(status="timeout", error={"type": "Timeout", "message": message})
                else:
                    row.update(status="skipped", skip="build failed", reason=message)
                w.stop(kill=True)
                workers[workers.index(w)] = None
                finish(w, row)
    for w in workers:
        if w is not None:
            w.stop()


# ------------------------------------------------------------------------------ the tables


def summarize(rows: list[dict[str, Any]], library: str | None = None) -> dict[str, Any]:
    rows = [r for r in rows if library is None or r["library"] == library]
    status = Counter(r["status"] for r in rows)
    checked = sum(status[s] for s in CHECKED)
    skips = Counter(r.get("skip") for r in rows if r["status"] == "skipped")
    return {
        "models": len(rows),
        "checked": checked,
        "clean": status["clean"],
        # a finding that a backward confirms is true, not a false alarm: out of the count
        "clean_pct": (
            round(100.0 * status["clean"] / (checked - status["confirmed"]), 1)
            if checked > status["confirmed"]
            else None
        ),
        "confirmed": status["confirmed"],
        "warnings": status["warnings"],
        "errors": status["errors"],
        "crashes": status["crash"],
        "timeouts": status["timeout"],
        "skipped": status["skipped"],
        "skipped_by_kind": dict(sorted(skips.items())),
        "worker_s": round(sum(r.get("seconds", 0.0) for r in rows), 1),
        "check_s": round(sum(r.get("check_s", 0.0) for r in rows), 1),
    }


def rule_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per rule: the checked models it flags (by library), its findings, their severities."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] not in CHECKED:
            continue
        seen: set[str] = set()
        for f in r.get("findings", []):
            entry = out.setdefault(
                f["rule"],
                {"name": f["name"], "models": Counter(), "findings": 0, "severities": Counter()},
            )
            entry["findings"] += 1
            entry["severities"][f["severity"]] += 1
            if f["rule"] not in seen:
                seen.add(f["rule"])
                entry["models"][r["library"]] += 1
    return {
        rule: {
            "name": e["name"],
            "models": dict(e["models"]),
            "findings": e["findings"],
            "severities": dict(e["severities"]),
        }
        for rule, e in sorted(out.items())
    }


def table(headers: list[str], rows: list[list[Any]], markdown: bool) -> str:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in cells]
    return "\n".join(lines)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def library_table(result: dict[str, Any], markdown: bool) -> str:
    headers = [
        "library",
        "models",
        "checked",
        "clean",
        "clean %",
        "confirmed",
        "warnings",
        "errors",
        "crashes",
        "timeouts",
        "skipped",
        "wall",
        "worker time",
    ]
    body = []
    libs = [lib for lib in LIBRARIES if lib in result["libraries"]]
    for lib in [*libs, "all"]:
        s = result["libraries"][lib] if lib != "all" else result["all"]
        wall = result.get("wall_s", {}).get(lib)
        body.append(
            [
                lib,
                s["models"],
                s["checked"],
                s["clean"],
                "" if s["clean_pct"] is None else f"{s['clean_pct']:.1f}",
                s.get("confirmed", 0),
                s["warnings"],
                s["errors"],
                s["crashes"],
                s["timeouts"],
                s["skipped"],
                _minutes(wall),
                _minutes(s["worker_s"]),
            ]
        )
    text = table(headers, body, markdown)
    skips = [
        f"{lib}: " + ", ".join(f"{n} {kind}" for kind, n in s["skipped_by_kind"].items())
        for lib in libs
        if (s := result["libraries"][lib])["skipped"]
    ]
    if skips:
        text += "\n\nskipped: " + "; ".join(skips)
    return text


def rule_table(counts: dict[str, dict[str, Any]], libs: list[str], markdown: bool) -> str:
    headers = ["rule", "name", *libs, "models", "findings", "severity"]
    body = []
    for rule, e in counts.items():
        body.append(
            [
                rule,
                e["name"],
                *(e["models"].get(lib, 0) for lib in libs),
                sum(e["models"].values()),
                e["findings"],
                ", ".join(f"{n} {s}" for s, n in sorted(e["severities"].items())),
            ]
        )
    return table(headers, body, markdown) if body else "(no findings)"


def build_result(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    libs = [lib for lib in LIBRARIES if any(r["library"] == lib for r in rows)]
    return {
        **meta,
        "libraries": {lib: summarize(rows, lib) for lib in libs},
        "all": summarize(rows),
        "rules": rule_counts(rows),
        "models": rows,
    }


def print_result(result: dict[str, Any], markdown: bool) -> None:
    libs = [lib for lib in LIBRARIES if lib in result["libraries"]]
    print(library_table(result, markdown))
    print()
    print("models flagged, per rule (every finding; info findings do not make a model unclean):")
    print(rule_table(result["rules"], libs, markdown))
    crashes = [r for r in result["models"] if r["status"] in ("crash", "timeout")]
    if crashes:
        print("\ncrashes and timeouts:")
        for r in crashes:
            print(f"  {r['library']} {r['name']}: {r['error']['message']}")


# ------------------------------------------------------------------------------ --compare


def _verdict(r: dict[str, Any]) -> str:
    return r["status"] if r["status"] != "skipped" else f"skipped ({r.get('skip')})"


def _flags(r: dict[str, Any]) -> set[str]:
    return (
        {f["rule"] for f in r.get("findings", []) if SEVERITY_ORDER[f["severity"]] >= 2}
        if r["status"] in CHECKED
        else set()
    )


def compare(before_path: str, after_path: str, markdown: bool) -> None:
    """The before/after tables: per library (verdict counts) and per rule (models flagged at
    warning or error), over the models both files hold, then every model whose verdict or
    flagging rules changed."""
    before = json.loads(Path(before_path).read_text(encoding="utf-8"))
    after = json.loads(Path(after_path).read_text(encoding="utf-8"))
    key = lambda r: (r["library"], r["name"])  # noqa: E731
    b = {key(r): r for r in before["models"]}
    a = {key(r): r for r in after["models"]}
    common = [k for k in b if k in a]
    if len(common) != len(b) or len(common) != len(a):
        print(
            f"comparing the {len(common)} models both files hold "
            f"(before: {len(b)}, after: {len(a)})\n"
        )
    libs = [lib for lib in LIBRARIES if any(k[0] == lib for k in common)]
    metrics = [
        ("checked", "checked"),
        ("clean", "clean"),
        ("clean %", "clean_pct"),
        ("with warnings", "warnings"),
        ("with errors", "errors"),
        ("crashes", "crashes"),
        ("timeouts", "timeouts"),
        ("skipped", "skipped"),
    ]
    body = []
    for lib in [*libs, "all"]:
        sb = summarize([b[k] for k in common], None if lib == "all" else lib)
        sa = summarize([a[k] for k in common], None if lib == "all" else lib)
        body.append([lib, *(f"{sb[field]} -> {sa[field]}" for _, field in metrics)])
    print("models, before -> after:")
    print(table(["library", *(label for label, _ in metrics)], body, markdown))

    rb = rule_counts([b[k] for k in common])
    ra = rule_counts([a[k] for k in common])
    body = []
    for rule in sorted(set(rb) | set(ra)):
        eb, ea = rb.get(rule), ra.get(rule)
        name = (eb or ea or {}).get("name", "")
        cells = []
        for lib in libs:
            cells.append(
                f"{(eb or {}).get('models', {}).get(lib, 0)} -> "
                f"{(ea or {}).get('models', {}).get(lib, 0)}"
            )
        total_b = sum((eb or {}).get("models", {}).values())
        total_a = sum((ea or {}).get("models", {}).values())
        body.append([rule, name, *cells, f"{total_b} -> {total_a}"])
    print("\nmodels with a finding of each rule, before -> after:")
    print(table(["rule", "name", *libs, "all"], body, markdown) if body else "(no findings)")

    changed = []
    for k in common:
        vb, va = _verdict(b[k]), _verdict(a[k])
        fb, fa = _flags(b[k]), _flags(a[k])
        if vb != va or fb != fa:
            changed.append(
                [
                    k[0],
                    k[1],
                    vb + (f" ({', '.join(sorted(fb))})" if fb else ""),
                    va + (f" ({', '.join(sorted(fa))})" if fa else ""),
                ]
            )
    print(f"\nmodels whose verdict changed: {len(changed)}")
    if changed:
        print(table(["library", "model", "before", "after"], changed, markdown))


# ------------------------------------------------------------------------------ main


def versions() -> dict[str, str]:
    import subprocess

    out = {"python": platform.python_version()}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    out["netdoctor commit"] = commit.stdout.strip() or "?"
    for name in ("torch", "torchvision", "timm", "transformers", "netdoctor"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:
            out[name] = "not installed"
    return out


def select_tasks(args) -> list[dict[str, Any]]:
    tasks = []
    for lib in args.library:
        found = list_models(lib)
        if args.only:
            wanted = set(args.only)
            found = [
                t
                for t in found
                if t["name"] in wanted
                or t.get("model_type") in wanted
                or f"{lib}:{t['name']}" in wanted
            ]
        elif args.sample:
            rng = random.Random(f"{args.seed}:{lib}")
            found = rng.sample(found, min(args.sample, len(found)))
            found.sort(key=lambda t: t["name"])
        tasks += found
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--library",
        default=",".join(LIBRARIES),
        help="comma separated: timm, torchvision, transformers (default: all three)",
    )
    parser.add_argument("--sample", type=int, help="N models drawn at random from each library")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample's draw")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    parser.add_argument("--max-params", type=float, default=50e6, help="timm: larger are skipped")
    parser.add_argument("--seg-size", type=int, default=224, help="torchvision segmentation side")
    parser.add_argument("--model-seed", type=int, default=0, help="netdoctor's seed (--seed)")
    parser.add_argument(
        "--deferred",
        action="store_true",
        help="build every model on the meta device, as check builds one too large to build",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--recycle", type=int, default=100, help="models per worker process")
    parser.add_argument("--max-rss-gb", type=float, default=6.0, help="replace a larger worker")
    parser.add_argument("--json", metavar="OUT", help="write every model's verdict and findings")
    parser.add_argument("--resume", action="store_true", help="skip models in OUT.partial.jsonl")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--summary", metavar="JSON", help="print the tables of a saved sweep")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="diff two sweeps")
    args = parser.parse_args(argv)

    if args.compare:
        compare(*args.compare, args.markdown)
        return 0
    if args.summary:
        print_result(json.loads(Path(args.summary).read_text(encoding="utf-8")), args.markdown)
        return 0

    args.library = [lib.strip() for lib in args.library.split(",") if lib.strip()]
    unknown = [lib for lib in args.library if lib not in LIBRARIES]
    if unknown:
        parser.error(f"unknown library {unknown[0]!r} (expected {', '.join(LIBRARIES)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # pretrained=False: nothing to download
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO / "src"))

    out = Path(args.json) if args.json else None
    partial = out.with_suffix(".partial.jsonl") if out else None
    log = str(out.with_suffix(".workers.log")) if out else os.devnull
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if partial is not None and args.resume and partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["library"], r["name"])] = r
    elif partial is not None:
        partial.write_text("", encoding="utf-8")

    tasks = select_tasks(args)
    todo = [t for t in tasks if (t["library"], t["name"]) not in done]
    print(
        f"{len(tasks)} models ({len(tasks) - len(todo)} already done), {args.workers} worker(s)",
        file=sys.stderr,
    )
    settings = {
        "max_params": args.max_params,
        "seg_size": args.seg_size,
        "model_seed": args.model_seed,
        "deferred": args.deferred,
        "threads": args.threads,
        "log": log,
    }
    rows = [done[(t["library"], t["name"])] for t in tasks if (t["library"], t["name"]) in done]
    wall: dict[str, float] = {}
    start = time.perf_counter()
    count = [len(rows)]

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        count[0] += 1
        rules = sorted({f["rule"] for f in row.get("findings", []) if f["severity"] != "info"})
        detail = row.get("reason") or (row.get("error") or {}).get("message") or " ".join(rules)
        print(
            f"[{count[0]}/{len(tasks)}] {row['library']} {row['name']}: {_verdict(row)} "
            f"{row.get('seconds', 0):.1f}s {detail}".rstrip(),
            file=sys.stderr,
            flush=True,
        )
        if partial is not None:
            with partial.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    for lib in args.library:
        lib_tasks = [t for t in todo if t["library"] == lib]
        t0 = time.perf_counter()
        run_tasks(lib_tasks, args, settings, on_row)
        wall[lib] = round(time.perf_counter() - t0, 1)
    total = round(time.perf_counter() - start, 1)

    order = {(t["library"], t["name"]): i for i, t in enumerate(tasks)}
    rows.sort(key=lambda r: order.get((r["library"], r["name"]), 0))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k not in ("compare", "summary")},
        "wall_s": {**wall, "all": total} if not done else {},
    }
    result = build_result(rows, meta)
    print_result(result, args.markdown)
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
