"""Examples for GaisNet: built-in domains (byte-level synthetic ones for the tiny model; invented
private records, skills and public capitals for a pretrained chat model), JSONL files, partitions,
token encoding."""

from gaisnet_ray.data.builders import device_examples, eval_examples, public_examples
from gaisnet_ray.data.domains import (
    BUILTIN_DOMAINS,
    BYTE_LEVEL_DOMAINS,
    DOMAINS,
    RECORD_DOMAINS,
    Domain,
    Example,
    Split,
    UnknownDomainError,
    get_domain,
    sample_examples,
)
from gaisnet_ray.data.jsonl import DatasetError, load_jsonl
from gaisnet_ray.data.partition import partition_dirichlet, partition_iid
from gaisnet_ray.data.records import RecordFact, record_facts

__all__ = [
    "BUILTIN_DOMAINS",
    "BYTE_LEVEL_DOMAINS",
    "DOMAINS",
    "DatasetError",
    "Domain",
    "Example",
    "IGNORE_INDEX",
    "RECORD_DOMAINS",
    "RecordFact",
    "Split",
    "Tokenizer",
    "UnknownDomainError",
    "device_examples",
    "encode_examples",
    "encode_prompt",
    "left_padded_batches",
    "eval_examples",
    "get_domain",
    "load_jsonl",
    "partition_dirichlet",
    "partition_iid",
    "public_examples",
    "record_facts",
    "sample_examples",
]


# The encoding helpers need torch; they load on first use, so that the driver can count each device's
# examples (``planner.command.sample_counts``) without importing torch.
_ENCODE = ("IGNORE_INDEX", "Tokenizer", "encode_examples", "encode_prompt", "left_padded_batches")


def __getattr__(name: str):
    if name in _ENCODE:
        from gaisnet_ray.data import encode

        return getattr(encode, name)
    raise AttributeError(f"module 'gaisnet_ray.data' has no attribute '{name}'")
