"""`netdoctor probe`: a short instrumented training run that measures gradient flow and training
dynamics, diagnoses them (rules ND4xx in netdoctor.rules.runtime) and verifies the top fix.

* `session`  -- the whole probe of one target: load, data, static/data rules, run, diagnose,
  verify (`probe_target` -> Report)
* `engine`   -- the probe's own training loop (`run_probe` -> `measure.record.TrainingRun`)
* `diagnose` -- links symptoms to their root causes (Finding.cause)
* `verify`   -- applies the top fix in memory and re-runs the probe (before/after)
"""
