"""ND5xx: the training loop itself; ND601-ND604: its mixed precision (`LoopContext.loop`, the
`netdoctor.measure.facts.LoopFacts` the watcher gathers inside the user's own training:
`netdoctor run`, `netdoctor.watch`, the trainer callbacks). The same rules judge live (to
announce a finding the moment it is confirmed, and for --stop-on, with `draft=True`) and at the
end."""
