"""Operator side of EdgeGuard (fleet tools). Never imported by the device runtime.

Each tool is a subpackage of its own (``edgeguard.fleet.ingest``: results into PostgreSQL); this module stays
empty so that importing one tool does not load the others.
"""
