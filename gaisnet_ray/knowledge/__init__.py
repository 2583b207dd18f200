"""Knowledge: PEFT (LoRA) adapter state dicts, keyed as ``get_peft_model_state_dict`` returns them.

Aggregation rules, byte accounting, content hashing and the versioned on-disk stores (one
``VersionedStore``: adapters in ``store``, foundation versions in ``bases``).
"""

from gaisnet_ray.knowledge.aggregate import (
    RULES,
    Rule,
    StateDict,
    aggregate,
    check_compatible,
    check_finite,
    clip_update,
    coordinate_median,
    fedavg,
    trimmed_mean,
    validate_updates,
)
from gaisnet_ray.knowledge.accounting import content_hash, payload_nbytes, tensor_nbytes
from gaisnet_ray.knowledge.errors import (
    KeyMismatchError,
    KnowledgeError,
    NonFiniteUpdateError,
    ShapeMismatchError,
)
from gaisnet_ray.knowledge.store import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    HISTORY_NAME,
    LINEAGE_NAME,
    KnowledgeStore,
)
from gaisnet_ray.knowledge.versioned import VersionedStore

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "HISTORY_NAME",
    "LINEAGE_NAME",
    "RULES",
    "KeyMismatchError",
    "KnowledgeError",
    "KnowledgeStore",
    "NonFiniteUpdateError",
    "Rule",
    "ShapeMismatchError",
    "StateDict",
    "VersionedStore",
    "aggregate",
    "check_compatible",
    "check_finite",
    "clip_update",
    "content_hash",
    "coordinate_median",
    "fedavg",
    "payload_nbytes",
    "tensor_nbytes",
    "trimmed_mean",
    "validate_updates",
]
