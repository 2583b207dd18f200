"""The data-free knowledge relay into the cloud's foundation model (core: no Ray).

After each round's aggregation the cloud absorbs what the edges relayed into the base model itself,
without any device data, by one of two policies (``relay.policy``):

- ``merge``: fold the global adapter into the base weights (``models.adapters.merged_base_state``);
- ``distill``: the base learns the edges' adapters on inputs the cloud generates itself, by KL in
  the cloud engine (``relay.distill``).

The new base is a version in ``knowledge/bases`` (``knowledge.bases``), goes back down to edges and
devices, and the next round starts from it with a fresh adapter. ``hfsl.cloud.CloudCore.relay``
runs the cycle.
"""
