"""The serving engine: request parameters, sampling, detokenization and the step loop."""
