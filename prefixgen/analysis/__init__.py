"""Analyses of datasets and traces that need no GPU: block counts, analyze, simulate."""
