"""A finished (or running) run folder as the serving side sees it: base model, knowledge versions,
the edges' adapters, and which edge knows which domain best.

Only intact versions are served: before a version is loaded it is checked against the content hash
its lineage recorded (``KnowledgeStore.verify``); a damaged one is skipped, logged once with the
reason, and the newest intact version older than it is served instead. Verdicts are cached per
version and file stamp (versions are immutable; a stamp change re-checks), so polling stays cheap.
Paths shown to clients are run-relative (``rel``, ``redact``): a server's folders are not theirs.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..knowledge.bases import BaseStore
from ..knowledge.errors import KnowledgeError
from ..knowledge.store import ADAPTER_WEIGHTS_NAME, LINEAGE_NAME, KnowledgeStore
from ..layout import MODEL_CONFIG_NAME, RunLayout
from ..models.prefix import refuse_prefix_serving
from .routing import ROUTING_NAME, RoutingTable

GLOBAL = "global"
log = logging.getLogger(__name__)


class DamagedVersionError(KnowledgeError):
    """A knowledge version that fails verification was asked for by number."""


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
    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return ((data.get("data") or {}).get("system_prompt")) if isinstance(data, dict) else None


class ServedRun:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.model_dir = self.layout.model
        if not self.layout.model_config.is_file():
            raise FileNotFoundError(f"'{self.run_dir}' is not a run folder with a model/ (no model/config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.system_prompt = _system_prompt(self.run_dir)
        self.store = KnowledgeStore(self.layout.knowledge)
        self.edges_root = self.layout.edges
        self.bases = BaseStore(self.layout.bases)
        self._verdicts: dict[tuple[str, int], tuple[tuple, str | None]] = {}
        self._verdict_lock = threading.Lock()
        self._tables: dict[tuple[str, int], tuple[tuple, RoutingTable | None]] = {}

    # ------------------------------------------------------------------------- names for clients
    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run folder (its bare name when it lies outside)."""
        return self.layout.rel(path)

    def redact(self, text: str) -> str:
        """``text`` with the run folder's absolute path taken out (messages that go to clients)."""
        for root in {str(self.run_dir.resolve()), str(self.run_dir)}:
            if root not in (".", ""):
                text = text.replace(root + "/", "").replace(root, ".")
        return text

    # ------------------------------------------------------------------------------ verification
    def verify(self, adapter: str, version: int) -> str | None:
        """None if ``adapter``'s ``version`` is intact, else why not (``KnowledgeStore.verify``, cached)."""
        store = self.adapter_store(adapter)
        folder = store.folder(version)
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None
                      for f in (folder / ADAPTER_WEIGHTS_NAME, folder / LINEAGE_NAME))
        with self._verdict_lock:
            cached = self._verdicts.get((adapter, version))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        why = store.verify(version)
        with self._verdict_lock:
            self._verdicts[(adapter, version)] = (stamp, why)
        if why is not None and (cached is None or cached[1] != why):
            log.warning("knowledge version v%04d of '%s' is damaged and will not be served: %s", version, adapter, why)
        return why

    def intact_version(self, adapter: str, up_to: int | None = None) -> tuple[int | None, dict[int, str]]:
        """The newest intact version of ``adapter`` (at most ``up_to``) and the newer ones skipped, with why."""
        skipped: dict[int, str] = {}
        for v in reversed(self.adapter_store(adapter).versions()):
            if up_to is not None and v > up_to:
                continue
            why = self.verify(adapter, v)
            if why is None:
                return v, skipped
            skipped[v] = why
        return None, skipped

    def skipped_versions(self, adapter: str) -> dict[int, str]:
        """Versions newer than the one ``adapter`` serves that failed verification (version -> why)."""
        return self.intact_version(adapter)[1]

    # ---------------------------------------------------------------------- calibrated routing
    def routing_table(self, adapter: str, version: int | None) -> RoutingTable | None:
        """The calibrated routing of ``adapter``'s ``version``: the ``routing.json`` published in the
        version folder (hash-checked with the weights by ``verify``), else a table calibrated after
        the run (``inference.calibrate``: ``routing/<adapter>/vNNNN.json``) that names this
        version's content hash; None when neither (the router then uses serve.routing.*). Cached
        per file stamp."""
        if version is None or adapter == "base" or "/" in adapter or adapter.startswith("."):
            return None
        from .calibrate import sidecar_path

        # per request on the router's path: no listing of the edges (adapter_store does one)
        store = self.store if adapter == GLOBAL else KnowledgeStore(self.edges_root / adapter)
        inside, sidecar = store.folder(version) / ROUTING_NAME, sidecar_path(self.run_dir, adapter, version)
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None for f in (inside, sidecar))
        cached = self._tables.get((adapter, version))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        table = None
        try:
            if inside.is_file():
                if self.verify(adapter, version) is None:
                    table = RoutingTable.from_json(inside.read_text(encoding="utf-8"))
            elif sidecar.is_file():
                table = RoutingTable.from_json(sidecar.read_text(encoding="utf-8"))
                expected = store.lineage(version).get("content_hash")
                if table.content_hash != expected or table.adapter != adapter or table.version != version:
                    log.warning("%s was calibrated for other weights than %s v%04d; using serve.routing.*",
                                self.rel(sidecar), adapter, version)
                    table = None
        except (OSError, ValueError, TypeError) as e:  # unreadable or malformed: the fixed limits
            log.warning("routing table of %s v%04d unreadable (%s); using serve.routing.*", adapter, version, e)
            table = None
        self._tables[(adapter, version)] = (stamp, table)
        return table

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
            version, _ = self.intact_version(edge)
            if version is None:
                continue
            for domain, loss in self.adapter_store(edge).lineage(version).get("eval_loss", {}).items():
                if domain not in best or loss < best[domain][0]:
                    best[domain] = (loss, edge)
        return {d: e for d, (_, e) in best.items()}

    def latest_base_version(self) -> int | None:
        """Newest base version a relay wrote (None: the run keeps one base, ``model/``)."""
        return self.bases.latest_version()

    def base_dir(self, version: int | None) -> Path:
        return self.bases.folder(version) if version is not None else self.model_dir

    def latest_base_dir(self) -> Path:
        """The newest foundation: the last base version a relay wrote, else ``model/``."""
        return self.base_dir(self.latest_base_version())

    def base_dir_for(self, store: KnowledgeStore, version: int) -> Path:
        """The base an adapter version applies to, as its lineage names it (a relay changes the
        base between versions); runs written before base versioning used ``model/``."""
        path = store.lineage(version).get("base", {}).get("path")
        folder = self.run_dir / path if path else self.model_dir
        if not (folder / MODEL_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"version {version} of {self.rel(store.root)} applies to base '{self.rel(folder)}', "
                                    f"which is missing")
        return folder

    def load_base(self, folder: Path | None = None):
        return AutoModelForCausalLM.from_pretrained(folder or self.latest_base_dir()).eval()

    def load_model(self, adapter: str = GLOBAL, version: int | None = None) -> tuple[PeftModel, int]:
        """The adapter's given (default: newest intact) version on the base it applies to, as plain
        peft loads it. A version that fails verification raises ``DamagedVersionError``."""
        store = self.adapter_store(adapter)
        if version is None:
            version, skipped = self.intact_version(adapter)
            if version is None:
                why = "; ".join(skipped.values()) if skipped else "none published"
                raise FileNotFoundError(f"no intact knowledge version of '{adapter}' in {self.run_dir.name} ({why})")
        elif version in store.versions() and (why := self.verify(adapter, version)) is not None:
            raise DamagedVersionError(f"version {version} of '{adapter}' is damaged: {why}")
        refuse_prefix_serving(store.path(version))  # the serving paths run their own KV cache
        base = self.load_base(self.base_dir_for(store, version))
        return PeftModel.from_pretrained(base, store.path(version)).eval(), version
