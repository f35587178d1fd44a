"""Operator-side fleet tools; each tool is a subpackage of its own. Never imported by the device runtime."""
