"""Planning the round: device profiles, a cost model of one HFSL round, and a planner that picks
each device's cut, the clusters and the edge bandwidth shares (no Ray, no torch at import)."""
