"""Inter-process plumbing: shared-memory token rings, doorbells, the typed wire protocol."""
