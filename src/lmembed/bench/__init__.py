"""Benchmarks that turn the papers' claims into tables and plots."""
