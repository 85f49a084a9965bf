"""A discrete-event model of a KevlarFlow deployment under failure: the cost
model (costs), the engine (model), the metrics (metrics), the measurement of
this machine's costs (calibrate) and the comparison with real runs (validate)."""
