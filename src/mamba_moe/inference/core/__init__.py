"""The engine core: requests, sampling, the running batch and the engine that drives it."""
