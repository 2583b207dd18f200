"""A finished (or running) run folder as the serving side sees it: base model, knowledge versions,
the edges' adapters, and which edge knows which domain best."""

from __future__ import annotations

from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..knowledge.bases import BaseStore
from ..knowledge.store import KnowledgeStore

GLOBAL = "global"


class UnknownAdapterError(KeyError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown adapter '{name}': served adapters are {known}")
        self.name, self.known = name, known

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return (type(self), (self.name, self.known))


def _system_prompt(run_dir: Path) -> str | None:
    """The system turn the run trained with (``data.system_prompt`` of its config.yaml), so served
    prompts are formatted exactly as training formatted them."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return ((data.get("data") or {}).get("system_prompt")) if isinstance(data, dict) else None


class ServedRun:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.model_dir = self.run_dir / "model"
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"'{self.run_dir}' is not a run folder with a model/ (no model/config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.system_prompt = _system_prompt(self.run_dir)
        self.store = KnowledgeStore(self.run_dir / "knowledge")
        self.edges_root = self.run_dir / "knowledge" / "edges"
        self.bases = BaseStore(self.run_dir / "knowledge" / "bases")

    def latest_version(self) -> int | None:
        return self.store.latest_version()

    def edge_ids(self) -> list[str]:
        if not self.edges_root.is_dir():
            return []
        return sorted(p.name for p in self.edges_root.iterdir() if KnowledgeStore(p).latest_version() is not None)

    def adapter_names(self) -> list[str]:
        return [GLOBAL, *self.edge_ids()]

    def adapter_store(self, name: str) -> KnowledgeStore:
        if name == GLOBAL:
            return self.store
        if name not in self.edge_ids():
            raise UnknownAdapterError(name, self.adapter_names())
        return KnowledgeStore(self.edges_root / name)

    def domain_adapters(self) -> dict[str, str]:
        """Domain -> the edge adapter with the lowest held-out loss on it (from the edges' lineage)."""
        best: dict[str, tuple[float, str]] = {}
        for edge in self.edge_ids():
            store = KnowledgeStore(self.edges_root / edge)
            for domain, loss in store.lineage(store.latest_version()).get("eval_loss", {}).items():
                if domain not in best or loss < best[domain][0]:
                    best[domain] = (loss, edge)
        return {d: e for d, (_, e) in best.items()}

    def latest_base_version(self) -> int | None:
        """Newest base version a relay wrote (None: the run keeps one base, ``model/``)."""
        return self.bases.latest_version()

    def base_dir(self, version: int | None) -> Path:
        return self.bases.path(version) if version is not None else self.model_dir

    def latest_base_dir(self) -> Path:
        """The newest foundation: the last base version a relay wrote, else ``model/``."""
        return self.base_dir(self.latest_base_version())

    def base_dir_for(self, store: KnowledgeStore, version: int) -> Path:
        """The base an adapter version applies to, as its lineage names it (a relay changes the
        base between versions); runs written before base versioning used ``model/``."""
        path = store.lineage(version).get("base", {}).get("path")
        folder = self.run_dir / path if path else self.model_dir
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"version {version} of {store.root} applies to base '{folder}', which is missing")
        return folder

    def load_base(self, folder: Path | None = None):
        return AutoModelForCausalLM.from_pretrained(folder or self.latest_base_dir()).eval()

    def load_model(self, adapter: str = GLOBAL, version: int | None = None) -> tuple[PeftModel, int]:
        """The adapter's given (default: latest) version on the base it applies to, as plain peft
        loads it."""
        store = self.adapter_store(adapter)
        version = store.latest_version() if version is None else version
        if version is None:
            raise FileNotFoundError(f"no knowledge version of '{adapter}' in {self.run_dir}")
        base = self.load_base(self.base_dir_for(store, version))
        return PeftModel.from_pretrained(base, store.path(version)).eval(), version
