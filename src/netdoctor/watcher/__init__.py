"""The doctor inside the user's own training (`netdoctor run`, `netdoctor.watch`, callbacks).

* `doctor`    -- the Doctor: receives the hook events, fills the records, judges live
* `attach`    -- torch's global hooks and the reversible wrappers (discovery, steps, backward)
* `models`    -- one watched model: root hooks, replay records, deep measurement on/off
* `optimizers`-- one watched optimizer: per-step norms, cleared-gradient and change checks
* `losses`    -- what the loss functions are fed (ND506, ND507, ignore_index NaN)
* `localize`  -- where the first NaN/Inf came from, in the user's loop
* `schedule`  -- which steps are measured deeply
* `facts`     -- the loop facts the ND5xx rules read (torch-free)
* `settings`  -- options and the watched run's config (torch-free)
* `diagnosis` -- records -> rules -> Report
* `script`    -- running a user's script as `python script.py` would (`netdoctor run`)

Integrations build on `Doctor` (see its docstring for the extension points: `add_model`,
`add_optimizer`, `observe_loss`, `stop_action="flag"`, `exchange` for DDP).
"""
