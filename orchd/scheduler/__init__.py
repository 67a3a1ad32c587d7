"""The scheduler process: the sans-IO core behind a ZeroMQ ROUTER socket."""
