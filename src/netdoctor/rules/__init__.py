"""The rules and the engine that runs them.

* `base`         -- what a rule is (`Rule`, `RuleOptions`, `Stage`)
* `contexts`     -- what a rule reads, one type per stage
* `verification` -- what a rule gives the verified fix (`SymptomSpec`, `Remedy`)
* `registry`     -- every rule, collected from `<stage>/ndNNN_<name>.py`
* `engine`       -- selection, options, severities, suppressions, notes and cause links, for
  `check`, `probe` and the watcher alike
* `meta/`, `graph/`, `params/`, `data/`, `runtime/`, `loop/` -- one module per rule

Torch-free: importing the rules (for `netdoctor rules`, `explain`, `--help`) never imports torch.
"""
