"""Prefect flows and the command line: wiring, logging, progress.  No maths here."""
