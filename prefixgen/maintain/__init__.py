"""Store maintenance: verify, compact (with merge), prune and gc."""
