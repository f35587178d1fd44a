"""Operator and publisher tools for fleets of EdgeGuard devices. Never imported by the device runtime
(``edgeguard.service`` and what it loads).

Each tool is a subpackage of its own (``edgeguard.fleet.provision``: CA, devices, broker config, sealing;
``edgeguard.fleet.commands``: signed commands; ``edgeguard.fleet.rollout``: deploys and staged rollouts;
``edgeguard.fleet.view``: status, watch, exporter; ``edgeguard.fleet.ingest``: results into PostgreSQL); this
module stays empty so that importing one tool does not load the others.
"""
