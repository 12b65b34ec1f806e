"""Argument parsing, the commands and the demo."""
