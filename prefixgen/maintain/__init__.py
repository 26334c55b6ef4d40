"""Store maintenance: verify (and later compact, prune, gc)."""
