"""A deployment across processes: workers that each own one pipeline stage, a
controller that schedules and routes, and the control plane between them."""
