"""ND4xx: training dynamics, judged on a measured run (`RuntimeContext.run`, a
`netdoctor.measure.record.TrainingRun` filled by the probe or by the watcher inside the user's
training). Thresholds are options; their defaults were calibrated on the fixtures (each rule's
doc in rules/ND4xx.md says how). Root causes are linked by the engine from each rule's `causes`.
"""
