"""Measurements of a training run, shared by every way in that trains, and what the rules read.

`netdoctor probe` (its own short run) and `netdoctor run` / `netdoctor.watch` (the user's own
training) fill the same record with the same instruments, so the runtime rules read one thing:

* `record`      -- `TrainingRun` and its traces (per parameter, per activation site, NaN origin)
* `summary`     -- what the rules and reporters read off a run (gradient flow, loss windows)
* `facts`       -- `LoopFacts`: what only the watcher sees in the user's loop (the loop rules)
* `inputs`      -- statistics of a data sample (scale, feature spread, labels, non-finite values)
* `activations` -- `ActivationRecorder`: module hooks + a TorchFunctionMode that measure every
  ReLU/sigmoid/tanh call (dead units, saturation) and know which module produced which tensor
* `params`      -- `ParamMeter`: gradient norms, weight norms and update ratios with fused
  `_foreach` norms and one host sync per measured step
* `nonfinite`   -- where the first NaN/Inf came from (replaying a forward with hooks)
* `targets`     -- how outputs meet targets (class indices or per-output), loss and accuracy

Torch-free: `record`, `summary` and `facts` (the rules import them).
"""
