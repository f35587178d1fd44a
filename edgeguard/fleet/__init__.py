"""Operator- and publisher-side fleet tools; never imported by the device runtime. Each tool is a subpackage
of its own."""
