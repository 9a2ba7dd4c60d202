"""Calibration of `--data synthetic` and of the verified fix, on the fixtures.

    python benchmarks/synthetic_calibration.py                 # every fixture below
    python benchmarks/synthetic_calibration.py lenet_relu mlp_seed_raw   # some of them
    python benchmarks/synthetic_calibration.py --markdown      # the tables for README / ND407

Each fixture is probed as a user would probe it -- `netdoctor probe FIXTURE --data synthetic`
with the default settings (100 steps of SGD, lr 0.01, momentum 0.9, batch 64; `--steps 100` is
passed so that the numbers do not depend on the machine's speed through the time budget) -- in
this process, one after the other. Printed per fixture:

* the loss over the first 10% of steps -> over the last 10%, the accuracy over the last 10%
  and chance (the share of the most common class);
* the warnings and errors the probe reported (a healthy fixture must have none);
* for the sick ones, the top finding and the verified fix: what was applied, loss and accuracy
  after, the symptom before -> after, and how many attempts it took (`improved` / `not
  improved` / `not in memory` when the fix needs a code change).

`--threads N` sets torch's intra-op threads (default: torch's own choice); on a machine shared
with other work, `--threads 1` avoids thread contention and gives the same numbers faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

H, S = "fixtures/healthy/", "fixtures/sick/"

# name -> (target, extra CLI arguments)
HEALTHY = {
    "lenet_relu": (H + "lenet_relu.py:LeNet", []),
    "mlp_normalized": (H + "mlp_normalized.py:MLP", []),
    "zero_head": (H + "zero_head.py:ZeroHeadMLP", []),
    "frozen_backbone": (H + "frozen_backbone.py:FrozenBackbone", []),
    "resnet": (H + "resnet.py:ResNet", []),
    "vgg_bn": (H + "vgg_bn.py:VGG11BN", []),
    "densenet": (H + "densenet.py:DenseNet", []),
    "mobilenet_v2": (H + "mobilenet_v2.py:MobileNetV2", []),
    "vit": (H + "vit.py:ViT", []),
    "attention_net": (H + "attention_net.py:AttentionNet", []),
    "lstm": (H + "lstm.py:LSTMClassifier", []),
    "transformer": (H + "transformer.py:TransformerClassifier", []),
    "gru_tagger": (H + "gru_tagger.py:GRUTagger", []),
    "unet": (H + "unet.py:UNet", ["--input-shape", "1,32,32"]),
    "bert": (H + "bert.py:BertClassifier", []),
    "rezero_transformer": (H + "rezero_transformer.py:ReZeroTransformer", []),
    "fixup_resnet": (H + "fixup_resnet.py:FixupResNet", []),
    "nf_resnet": (H + "nf_resnet.py:NFResNet", []),
    "se_resnet": (H + "se_resnet.py:SEResNet", []),
    "tv_init_classifier": (H + "tv_init_classifier.py:TVInitMobileNet", []),
}
SICK = {
    "lenet_sigmoid": (S + "lenet_sigmoid.py:LeNet", []),
    "sigmoid_mlp": (S + "sigmoid_mlp.py:SigmoidMLP", []),
    "plain_cnn20": (S + "plain_cnn20.py:PlainCNN20", []),
    "zero_init": (S + "zero_init.py:ZeroHiddenMLP", []),
    "detached": (S + "detached.py:DetachedFeatures", []),
    "data_features": (S + "detached_variants.py:DataFeatures", []),
    "no_grad_backbone": (S + "detached_variants.py:NoGradBackbone", []),
    "tiny_init_mlp": (S + "bad_init.py:TinyInitMLP", []),
    "deep_tanh_mlp": (S + "bad_init.py:DeepTanhMLP", []),
    "deep_relu_mlp": (S + "bad_init.py:DeepReLUMLP", []),
    "bn_momentum_0.9": (S + "bn_momentum.py:KerasMomentumNet", []),
    "bn_momentum_0": (S + "bn_momentum.py:KerasMomentumNet", ["-a", "momentum=0"]),
    "relu_logits": (S + "relu_logits.py:ReluLogitsNet", []),
    "softmax_output": (S + "softmax_output.py:SoftmaxNet", []),
    "collapsed_mlp": (S + "linear_collapse.py:CollapsedMLP", []),
    "broken_residual": (S + "broken_residual.py:Net", []),
    "gated_deep_net": (S + "untraceable_plain.py:GatedDeepNet", []),
    "mlp_seed": (S + "mlp.py:MLP", []),
    # the seed report itself: raw 0..255 pixels (FashionMNIST layout) at lr 0.5, momentum 0.9
    "mlp_seed_raw": (S + "mlp.py:MLP", ["--data", "fashionmnist", "--raw", "--lr", "0.5"]),
}


def probe(target: str, extra: list[str], data_dir: str) -> dict:
    import json

    from click.testing import CliRunner

    from netdoctor.cli import main

    args = ["probe", target, "--data", "synthetic", "--steps", "100", "--format", "json", *extra]
    if "fashionmnist" in extra:
        args = [a for a in args if a != "synthetic"]
        args.remove("--data")
        args += ["--data-dir", data_dir]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if not result.stdout.strip():
        return {"error": result.stderr.strip()}
    return json.loads(result.stdout)


def row(name: str, report: dict, seconds: float) -> dict:
    from netdoctor.measure.summary import mean

    if "error" in report:
        return {"name": name, "error": report["error"]}
    m = report.get("measurements", {})
    losses = m.get("loss_curve") or []
    accs = [a for a in m.get("accuracy_curve") or [] if a is not None]
    k = max(1, len(losses) // 10)
    loud = sorted({f["rule"] for f in report["findings"] if f["severity"] in ("warning", "error")})
    out = {
        "name": name,
        "loss_first": mean(losses[:k]),
        "loss_last": mean(losses[-k:]),
        "accuracy": mean(accs[-k:]) if accs else None,
        "loud": loud,
        "fix_first": report["summary"].get("fix_first"),
        "seconds": seconds,
    }
    labels = m.get("probe") or {}
    out["steps"] = labels.get("steps")
    out["chance"] = m.get("chance")
    vf = m.get("verified_fix")
    if vf:
        sym = vf.get("symptom") or {}
        out["verified"] = (
            "improved"
            if vf.get("outcome_improved")
            else "symptom only"
            if vf.get("improved")
            else "not improved"
        )
        out["applied"] = vf.get("applied")
        out["after"] = vf.get("after")
        out["before"] = vf.get("before")
        out["symptom"] = (
            (f"{sym.get('name')}: {sym.get('before_text')} -> {sym.get('after_text')}")
            if sym
            else None
        )
        out["attempts"] = len(vf.get("attempts") or [])
        out["vf_steps"] = vf.get("steps")
    elif out["fix_first"]:
        note = next(
            (n for n in report.get("notes", []) if "cannot be applied in memory" in n), None
        )
        out["verified"] = "not in memory" if note else "not verified"
    return out


def fmt(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def print_rows(rows: list[dict], markdown: bool, sick: bool) -> None:
    if markdown:
        if sick:
            print(
                "| fixture | fix first | verified | applied | loss before → after "
                "(accuracy) | symptom |"
            )
            print("|---|---|---|---|---|---|")
        else:
            print("| fixture | loss first → last | accuracy | chance | warnings |")
            print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(
                f"| {r['name']} | error: {r['error']} |"
                if markdown
                else f"{r['name']:18s} ERROR {r['error']}"
            )
            continue
        curve = f"{fmt(r['loss_first'])} → {fmt(r['loss_last'])}"
        if markdown and sick:
            b, a = r.get("before") or {}, r.get("after") or {}
            outcome = (
                f"{fmt(b.get('loss_last'))} ({fmt(b.get('accuracy'))}) → "
                f"{fmt(a.get('loss_last'))} ({fmt(a.get('accuracy'))})"
                if r.get("after")
                else ""
            )
            if r.get("vf_steps") and r.get("vf_steps") != r.get("steps"):
                outcome += f", {r['vf_steps']} steps"
            print(
                f"| {r['name']} | {r['fix_first'] or '-'} | {r.get('verified', '-')} | "
                f"{r.get('applied') or '-'} | {outcome} | {r.get('symptom') or ''} |"
            )
        elif markdown:
            print(
                f"| {r['name']} | {curve} | {fmt(r['accuracy'])} | {fmt(r['chance'])} | "
                f"{', '.join(r['loud']) or 'none'} |"
            )
        else:
            line = (
                f"{r['name']:18s} {curve}  acc {fmt(r['accuracy'])}  chance "
                f"{fmt(r['chance'])}  loud {','.join(r['loud']) or '-'}  "
                f"{r['seconds']:.1f}s"
            )
            if sick:
                line += (
                    f"\n{'':18s} fix first {r['fix_first']}: {r.get('verified')} "
                    f"[{r.get('applied')}] after {r.get('after')} | {r.get('symptom')} "
                    f"| attempts {r.get('attempts')}"
                )
            print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="fixtures to run (default: all)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    args = ap.parse_args()
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from datagen import write_idx_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_idx_dataset(Path(tmp), "FashionMNIST", n_train=1024, n_test=64, images="templates")
        for title, table, sick in (("healthy", HEALTHY, False), ("sick", SICK, True)):
            names = [n for n in table if not args.names or n in args.names]
            if not names:
                continue
            rows = []
            print(f"\n{title} fixtures, --data synthetic, default probe (100 steps)\n", flush=True)
            for name in names:
                target, extra = table[name]
                t = time.perf_counter()
                report = probe(target, extra, tmp)
                r = row(name, report, time.perf_counter() - t)
                rows.append(r)
                if not args.markdown:
                    print_rows([r], False, sick)
            if args.markdown:
                print_rows(rows, True, sick)


if __name__ == "__main__":
    main()
