"""`netdoctor probe`: a short instrumented training run that measures gradient flow and training
dynamics, diagnoses them (rules ND4xx in netdoctor.rules.runtime) and verifies the top fix.

* `session`  -- the whole probe of one target: load, data, static/data rules, run, diagnose,
  verify (`probe_target` -> Report)
* `config`   -- what the run does (`ProbeConfig`: steps, optimizer, loss, seed, ...)
* `engine`   -- the probe's own training loop (`run_probe` -> `measure.record.TrainingRun`)
* `end_checks` -- the checks after the run: train/eval-mode gap, overfit one batch
* `diagnose` -- links symptoms to their root causes (Finding.cause)
* `verify`   -- applies the top fix in memory and re-runs the probe (before/after)
"""
