"""Hybrid federated split learning (HFSL): the algorithm, with no Ray import."""
