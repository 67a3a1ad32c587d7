"""Engine supervisors (one process per replica) and the adapters that speak to engines."""
