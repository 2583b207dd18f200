"""Inference over the relayed knowledge, with no Ray import: generation with a KV cache and
confidence signals, split inference runners, tier routing policy, binary tensor payloads, and the
run folder as the serving side sees it. ``gaisnet_ray.serve`` wraps these in Ray Serve."""

from .codec import tensor_from_bytes, tensor_to_bytes
from .generate import CausalGenerator, Generation, PromptTooLongError
from .routing import RouteDecision, RoutingPolicy, infer_domain, route_after_edge, route_hint
from .split import FrontRunner, RestRunner, split_stream

__all__ = [
    "CausalGenerator", "FrontRunner", "Generation", "PromptTooLongError", "RestRunner", "RouteDecision",
    "RoutingPolicy", "infer_domain", "route_after_edge", "route_hint", "split_stream", "tensor_from_bytes",
    "tensor_to_bytes",
]
