"""Datasets to token records: streaming sources and tokenization (shared by build, analyze and simulate)."""
