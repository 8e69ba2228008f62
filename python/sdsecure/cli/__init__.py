"""Command-line entry points (console scripts sdsecure-generate, sdsecure-audit)."""
