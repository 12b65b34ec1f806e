"""Composition root, workers, signals, logs: builds the parts once and closes them in reverse."""
