"""`netdoctor probe`: a short instrumented training run that measures gradient flow and training
dynamics, diagnoses them (rules ND4xx in netdoctor.rules.runtime) and verifies the top fix.

* `engine`   -- the training loop and its instrumentation (`run_probe` -> `ProbeRun`)
* `diagnose` -- links symptoms to their root causes (Finding.cause)
* `verify`   -- applies the top fix in memory and re-runs the probe (before/after)
* `command`  -- the click command (imports torch lazily)
"""
