"""Tiered inference on Ray Serve over a run folder's model and relayed knowledge.

Deployments, one module per role: ``end.py`` (device front segment, split inference inside the
cluster), ``edge.py`` (base + every adapter, multiplexed per request; the rest of a split model),
``cloud.py`` (base + the latest global knowledge), ``ingress.py`` (the FastAPI HTTP API) over
``router.py`` (``TierRouter``: which tier answers). ``app.py`` wires them (``build_app``,
``app_builder`` for ``serve run``, ``serve_run_dir`` and ``start_serving`` for the CLI). The
``serve:`` settings live in the config layer (``gaisnet_ray.config.serve``).

This package file imports nothing heavy on purpose: ``client`` runs on devices that have no Ray.
Import the submodule you need.
"""
