"""`netdoctor probe`: a short instrumented training run that measures gradient flow and training
dynamics, diagnoses them (the runtime rules ND4xx, netdoctor.rules.runtime) and verifies the top
fix.

* `session`  -- the whole probe of one target: load, data, static/data rules, run, diagnose,
  verify (`probe_target` -> Report)
* `config`   -- what the run does (`ProbeConfig`: steps, optimizer, loss, seed, ...)
* `engine`   -- the probe's own training loop (`run_probe` -> `measure.record.TrainingRun`)
* `end_checks` -- the checks after the run: train/eval-mode gap, overfit one batch
* `settings` -- what the command was asked for (`ProbeSettings`: data, steps, budget, verify)
* `budget`   -- fitting the probe into its time budget
* `measurements` -- the run's numbers as the report carries them
* `verify`   -- applies the top fix in memory and re-runs the probe (before/after)
"""
