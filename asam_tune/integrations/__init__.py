"""Asynchronous SAM inside other frameworks' training loops (each module imports its framework on first use)."""
