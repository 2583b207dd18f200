"""Examples for GaisNet: built-in synthetic domains, JSONL files, partitions, token encoding."""

from gaisnet_ray.data.builders import device_examples, eval_examples, public_examples
from gaisnet_ray.data.domains import (
    BUILTIN_DOMAINS,
    Example,
    Split,
    UnknownDomainError,
    sample_examples,
)
from gaisnet_ray.data.encode import IGNORE_INDEX, Tokenizer, encode_examples, encode_prompt
from gaisnet_ray.data.jsonl import DatasetError, load_jsonl
from gaisnet_ray.data.partition import partition_dirichlet, partition_iid

__all__ = [
    "BUILTIN_DOMAINS",
    "DatasetError",
    "Example",
    "IGNORE_INDEX",
    "Split",
    "Tokenizer",
    "UnknownDomainError",
    "device_examples",
    "encode_examples",
    "encode_prompt",
    "eval_examples",
    "load_jsonl",
    "partition_dirichlet",
    "partition_iid",
    "public_examples",
    "sample_examples",
]
