"""Benchmarks: `sphere bench <name>`; each prints one JSON object as its last stdout line."""
