"""Tiered inference on Ray Serve over a run folder's model and relayed knowledge.

Deployments, one module per role: ``end.py`` (device front segment, split inference inside the
cluster), ``edge.py`` (base + every adapter, multiplexed per request; the rest of a split model),
``cloud.py`` (base + the latest global knowledge), ``ingress.py`` (FastAPI router: the HTTP API and
the tier routing). ``app.py`` wires them (``build_app``, ``app_builder`` for ``serve run``,
``serve_run_dir`` and ``start_serving`` for the CLI).

This package file imports nothing heavy on purpose: ``settings`` (pydantic only) is part of the
config tree and ``client`` runs on devices that have no Ray. Import the submodule you need.
"""
