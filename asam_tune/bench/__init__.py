"""Benchmarks that measure the product's claims (scripts, not tests): speed and accuracy."""
