"""Operator and publisher tools for fleets of EdgeGuard devices; each tool is a subpackage of its own.

Never imported by the device runtime (``edgeguard.service`` and what it loads).
"""
