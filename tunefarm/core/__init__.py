"""Shared pieces that every role imports: errors, wire formats, job specs, process helpers."""
