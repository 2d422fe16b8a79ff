"""The bottom layer: errors, distributed runtime, files, seeds, run-directory layout; imports nothing above it."""
