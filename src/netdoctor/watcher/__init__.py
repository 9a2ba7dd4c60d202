"""The doctor inside the user's own training (`netdoctor run`, `netdoctor.watch`, callbacks).

* `doctor`      -- the Doctor: lifecycle, public API, and the dispatcher of events to its parts
* `events`      -- the event protocol: typed events, the `Part` hooks, the `Dispatcher`
* `services`    -- what the parts share: the guard (busy, errors, notes), the dirty rules
* `attach`      -- torch's global hooks and the reversible wrappers (discovery, steps, backward)
* `registry`    -- part: which models and optimizers are watched, their root hooks, feeds
* `measurement` -- part: the per-step measurements (one host sync) and the deep steps' meters
* `loopwatch`   -- part: the loop facts for ND501-ND507, and which rules they make dirty
* `localize`    -- part: where the first NaN/Inf came from, in the user's loop
* `static`      -- part: the static rules, once per model at its first step
* `distributed` -- part: the ranks' exchange under torchrun (ND508, one report for the job)
* `tensorboard` -- part: the TensorBoard export (per-step scalars, deep steps, findings)
* `live`        -- the live judgement: announcement and stop_on
* `diagnosis`   -- what the parts gathered -> rules -> Report
* `models`      -- one watched model: root hooks, replay records, deep measurement on/off
* `optimizers`  -- one watched optimizer: per-step norms, cleared-gradient and change checks
* `losses`      -- what the loss functions are fed (ND506, ND507, ignore_index NaN)
* `replicas`    -- DDP wrappers and the checksums of their replicated parameters (ND508)
* `ranks`       -- the job's report merged from every rank's (torch-free)
* `schedule`    -- which steps are measured deeply
* `settings`    -- options and the watched run's config (torch-free)
* `script`      -- running a user's script as `python script.py` would (`netdoctor run`)

Integrations build on `Doctor` (see its docstring for the extension points: `add_model`,
`add_optimizer`, `observe_loss`, `stop_action="flag"`, `running_doctor()`).
"""
