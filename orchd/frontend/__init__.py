"""The frontend process: the only HTTP speaker. Validates, asks the scheduler, streams SSE."""
