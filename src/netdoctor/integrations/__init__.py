"""netdoctor inside a trainer: callbacks for the trainers that own the training loop.

* `netdoctor.integrations.lightning.DoctorCallback` -- a Lightning `Callback`
  (`lightning.pytorch` or `pytorch_lightning`, whichever is installed);
* `netdoctor.integrations.transformers.DoctorCallback` -- a Hugging Face `TrainerCallback`.

Both take the options of `netdoctor.watch` (`output`, `format`, `every`, `select`, `ignore`,
`stop_on`, `fail_on`, ...) and share `session.TrainerSession`, the life cycle of one watched fit.
Importing this package (or the two modules) imports neither trainer nor torch: the trainer is
imported when `DoctorCallback` is first looked up.
"""
