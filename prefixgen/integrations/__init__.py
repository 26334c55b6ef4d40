"""Servers that read a store: the reference OpenAI-compatible server, and connectors for serving engines."""
