"""One run layout and one versioned store (issue 12, item 2): every run-folder path named in
``layout.RunLayout``; ``knowledge.versioned.VersionedStore`` owns atomic publish, lineage,
integrity and ``truncate``; ``model/`` is swapped in one rename; ``--resume`` cuts each store back
through the store. No Ray; torch only where adapters are published."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from gaisnet_ray.knowledge import bases as bases_module
from gaisnet_ray.knowledge import versioned
from gaisnet_ray.knowledge.bases import BaseStore, refresh_model_dir
from gaisnet_ray.knowledge.errors import KnowledgeError
from gaisnet_ray.knowledge.versioned import HISTORY_NAME, LINEAGE_NAME, VersionedStore, exchange_paths
from gaisnet_ray.layout import RunLayout, version_name

PACKAGE = Path(__file__).resolve().parents[1] / "gaisnet_ray"


# --- the layout -------------------------------------------------------------------------------------

def test_layout_names_every_run_folder_path(tmp_path):
    run = RunLayout(tmp_path / "run")
    rel = {name: getattr(run, name).relative_to(run.root).as_posix() for name in (
        "config", "metrics", "summary", "report", "plan", "model", "model_config", "knowledge", "bases", "edges",
        "cloud_checkpoints", "initial_eval", "audit", "log_file", "orphaned")}
    assert rel == {"config": "config.yaml", "metrics": "metrics.jsonl", "summary": "run.json",
                   "report": "report.png", "plan": "plan.json", "model": "model", "model_config": "model/config.json",
                   "knowledge": "knowledge", "bases": "knowledge/bases", "edges": "knowledge/edges",
                   "cloud_checkpoints": "cloud/checkpoints", "initial_eval": "cloud/initial_eval.json",
                   "audit": "audit", "log_file": "logs/gaisnet.log", "orphaned": "orphaned"}
    assert run.version_dir(3) == run.root / "knowledge" / "v0003"
    assert run.base_dir(12345) == run.root / "knowledge" / "bases" / "b12345"  # four digits at least
    assert run.edge_store("edge-1") == run.root / "knowledge" / "edges" / "edge-1"
    assert run.privacy_audit().name == "privacy_audit.json"
    assert run.privacy_audit("activation_noise-0.5 x/y").name == "privacy_audit-activation_noise-0.5_x_y.json"
    assert run.rel(run.version_dir(2)) == "knowledge/v0002" and run.rel(run.root) == "."
    assert run.rel("/elsewhere/secret/model") == "model"  # never a path outside the run folder
    assert version_name(7) == "v0007" and version_name(7, "b") == "b0007"
    assert not run.holds_run() and list(tmp_path.iterdir()) == []  # naming creates nothing
    run.knowledge.mkdir(parents=True)
    assert run.holds_run()


# a run-folder name joined onto a path (`x / "knowledge"`), the pattern RunLayout replaces
_JOINED_LITERAL = re.compile(r'/\s*"(config\.yaml|metrics\.jsonl|report\.png|run\.json|plan\.json|model|knowledge|'
                             r'bases|edges|audit|orphaned|privacy_audit\.json|lineage\.jsonl?)"')


def test_no_module_joins_run_folder_names_by_hand():
    """Every run-folder path is named once, in layout.py (and a store's own file names in its store)."""
    found = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
             for p in sorted(PACKAGE.rglob("*.py")) if p.name != "layout.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if _JOINED_LITERAL.search(line)]
    assert found == []


# --- the versioned store ------------------------------------------------------------------------------

class NoteStore(VersionedStore):
    """The smallest content: one text file per version (``note.txt``), checked against its lineage."""

    prefix = "n"
    noun = "note"

    def publish(self, version: int, text: str, lineage: dict, fail: bool = False) -> Path:
        def write(tmp: Path) -> None:
            (tmp / "note.txt").write_text(text)
            if fail:
                raise OSError("disk full")

        return self._publish(version, write, lineage, extra=lambda tmp: {"chars": len(text)})

    def _check_content(self, folder: Path, record: dict, deep: bool) -> str | None:
        note = folder / "note.txt"
        if not note.is_file():
            return "note.txt is missing"
        return None if len(note.read_text()) == record.get("chars") else "note.txt does not match its lineage"


def test_publish_is_whole_or_absent_with_lineage_inside_and_in_the_log(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(versioned, "fsync_tree", lambda p: synced.append(sorted(x.name for x in p.iterdir())))
    store = NoteStore(tmp_path / "notes")
    assert store.versions() == [] and store.latest_version() is None and store.history() == []
    folder = store.publish(0, "abc", {"round": 0})
    assert folder == tmp_path / "notes" / "n0000" and store.path(0) == folder
    assert synced == [["lineage.json", "note.txt"]]  # fsynced with its lineage, before the rename
    record = store.lineage(0)
    assert record["round"] == 0 and record["chars"] == 3 and record["version"] == 0 and "created_at" in record
    store.publish(1, "abcd", {"round": 1})
    assert store.versions() == [0, 1] and store.latest_version() == 1
    assert store.history() == [store.lineage(0), store.lineage(1)]

    with pytest.raises(KnowledgeError, match="note 1 already exists"):
        store.publish(1, "x", {})
    with pytest.raises(KnowledgeError, match=r"lineage keys \['created_at'\] are reserved"):
        store.publish(2, "x", {"created_at": "now"})
    with pytest.raises(KnowledgeError, match="must be an int >= 0"):
        store.publish(-1, "x", {})
    with pytest.raises(TypeError):
        store.publish(2, "x", {"bad": object()})  # not JSON: refused before anything is written
    with pytest.raises(OSError, match="disk full"):
        store.publish(2, "x", {}, fail=True)  # a write that fails leaves no folder, no log line
    with pytest.raises(KnowledgeError, match=r"note 2 not found in .*have \[0, 1\]"):
        store.path(2)
    assert sorted(p.name for p in store.root.iterdir()) == [HISTORY_NAME, "n0000", "n0001"]
    assert len(store.history()) == 2


def test_verify_damaged_and_latest_intact(tmp_path):
    store = NoteStore(tmp_path)
    for v in range(4):
        store.publish(v, "x" * (v + 1), {})
    (store.folder(3) / "note.txt").write_text("cut")
    (store.folder(2) / LINEAGE_NAME).write_text("{not json")
    (store.folder(1) / LINEAGE_NAME).unlink()  # no published version, but a damaged folder
    assert store.versions() == [0, 2, 3]
    assert store.damaged() == {1: f"n0001: {LINEAGE_NAME} is missing",
                               2: f"n0002: {LINEAGE_NAME} is unreadable (JSONDecodeError)",
                               3: "n0003: note.txt does not match its lineage"}
    assert store.latest_intact() == (0, {3: store.damaged()[3], 2: store.damaged()[2]})
    assert store.latest_intact(up_to=0) == (0, {})
    assert store.folder_versions() == [0, 1, 2, 3]


def test_truncate_moves_later_versions_and_temporary_folders_and_cuts_the_log(tmp_path):
    store = NoteStore(tmp_path / "notes")
    for v in range(4):
        store.publish(v, "x", {"round": v})
    (store.root / ".tmp-n0004-abc").mkdir()
    with open(store.root / HISTORY_NAME, "a") as fh:
        fh.write('{"version": 4, "rou')  # an append a kill cut short
    stash = tmp_path / "orphaned" / "t" / "notes"

    moved = store.truncate(after=1, stash=stash)
    assert sorted(p.name for p in moved) == [".tmp-n0004-abc", "n0002", "n0003"]
    assert all(p.parent == stash and p.is_dir() for p in moved)
    assert store.versions() == [0, 1] and [r["version"] for r in store.history()] == [0, 1]
    later = (stash / HISTORY_NAME).read_text().splitlines()
    assert [json.loads(x)["version"] for x in later[:2]] == [2, 3] and later[2] == '{"version": 4, "rou'
    assert (stash / "n0002" / LINEAGE_NAME).is_file()  # moved, not deleted
    assert sorted(p.name for p in store.root.iterdir()) == [HISTORY_NAME, "n0000", "n0001"]
    assert store.truncate(after=1, stash=stash) == []  # nothing more to cut: a second resume changes nothing
    assert NoteStore(tmp_path / "absent").truncate(after=0, stash=stash) == []
    store.publish(2, "again", {})  # the continuation publishes the cut version numbers afresh
    assert store.versions() == [0, 1, 2]


# --- bases and model/ --------------------------------------------------------------------------------

class FakeModel:
    """What BaseStore needs of a model and a tokenizer: ``save_pretrained(folder)``."""

    def __init__(self, weights: bytes, files: dict[str, str] | None = None):
        self.weights, self.files = weights, files or {"config.json": '{"model_type": "gpt2"}'}

    def save_pretrained(self, folder) -> None:
        for name, text in self.files.items():
            (Path(folder) / name).write_text(text)
        if self.weights:
            (Path(folder) / "model.safetensors").write_bytes(self.weights)


TOKENIZER = FakeModel(b"", {"tokenizer.json": "{}"})


def test_base_store_records_a_file_manifest_and_verify_checks_it(tmp_path):
    bases = BaseStore(tmp_path / "bases")
    folder = bases.publish(0, FakeModel(b"w" * 1000), TOKENIZER, {"parent_version": None, "content_hash": "h0"})
    assert folder.name == "b0000" and bases.versions() == [0]
    files = bases.lineage(0)["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert files["model.safetensors"]["bytes"] == 1000 and len(files["model.safetensors"]["sha256"]) == 64
    assert bases.verify(0, deep=True) is None
    weights = folder / "model.safetensors"
    weights.write_bytes(b"w" * 999 + b"x")  # same size, one byte changed: only the deep check sees it
    assert bases.verify(0) is None
    assert bases.verify(0, deep=True) == "b0000: model.safetensors does not match the sha256 its lineage recorded"
    weights.write_bytes(b"w" * 500)
    assert bases.damaged() == {0: "b0000: model.safetensors has 500 bytes, not the 1000 published"}
    with pytest.raises(KnowledgeError, match="base version 3 does not exist"):
        bases.lineage(3)
    with pytest.raises(KnowledgeError, match="reserved"):
        bases.publish(1, FakeModel(b"w"), TOKENIZER, {"files": {}})
    # a base written before the manifest: config.json is all there is to check
    old = bases.folder(5)
    old.mkdir()
    (old / LINEAGE_NAME).write_text(json.dumps({"version": 5}))
    assert bases.verify(5) == "b0005: config.json is missing"
    (old / "config.json").write_text("{}")
    assert bases.verify(5) is None


def _can_exchange(tmp_path: Path) -> bool:
    probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
    for p in probe:
        p.mkdir()
    return exchange_paths(*probe)


def test_model_dir_is_swapped_in_one_rename_and_never_missing(tmp_path, monkeypatch):
    if not _can_exchange(tmp_path):
        pytest.skip("this OS or file system cannot exchange two folders (the fallback is tested below)")
    run = RunLayout(tmp_path / "run")
    bases = BaseStore(run.bases)
    sources = [bases.publish(v, FakeModel(bytes([v]) * 4096), TOKENIZER, {}) for v in range(3)]
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((Path(a), Path(b))), real_rename(a, b))[1])
    refresh_model_dir(run.root, sources[0])  # no model/ yet: a plain rename
    assert (run.model / "model.safetensors").read_bytes() == b"\0" * 4096
    assert not (run.model / LINEAGE_NAME).exists()  # the lineage stays with the base version
    for source in sources[1:]:
        refresh_model_dir(run.root, source)
    # model/ is only ever the target of a rename or one side of an exchange: never moved away first
    assert [src for src, _ in renames if src == run.model] == []
    assert (run.model / "model.safetensors").read_bytes() == b"\2" * 4096
    assert run.model_swaps() == []  # nothing left beside model/
    src, dst = sources[2] / "model.safetensors", run.model / "model.safetensors"
    assert os.path.samefile(src, dst) or src.read_bytes() == dst.read_bytes()  # linked where possible
    assert bases.verify(2, deep=True) is None  # the base version is untouched by the swap


def test_model_dir_swap_without_an_exchange_call_still_ends_whole(tmp_path, monkeypatch):
    """Where the OS cannot exchange: rename aside, rename in; a failed second rename puts the old back."""
    monkeypatch.setattr(bases_module, "exchange_paths", lambda a, b: False)
    run = RunLayout(tmp_path)
    bases = BaseStore(run.bases)
    for v in range(2):
        bases.publish(v, FakeModel(bytes([v]) * 10), TOKENIZER, {})
        refresh_model_dir(run.root, bases.folder(v))
    assert (run.model / "model.safetensors").read_bytes() == b"\1" * 10 and run.model_swaps() == []

    bases.publish(2, FakeModel(b"\2" * 10), TOKENIZER, {})
    real_rename = os.rename

    def rename(a, b):
        if Path(b) == run.model and Path(a).name.startswith(".model-") and not Path(a).name.startswith(".model-old"):
            raise OSError("interrupted")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        refresh_model_dir(run.root, bases.folder(2))
    assert (run.model / "model.safetensors").read_bytes() == b"\1" * 10 and run.model_swaps() == []


# --- resume ------------------------------------------------------------------------------------------

def _relay_run(root: Path, rounds_done: int, rounds_started: int) -> RunLayout:
    """A relay run killed in round ``rounds_started``: knowledge v0..v<started> (global and one edge),
    bases b0..b<started>, model/ = the newest base, metrics for rounds 1..<done>."""
    import torch
    from peft import LoraConfig

    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.knowledge.store import KnowledgeStore
    from tinycfg import tiny_config

    run = RunLayout(root)
    root.mkdir(parents=True)
    run.config.write_text(config_to_yaml(tiny_config("relay.policy=merge")))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    for v in range(rounds_started + 1):
        KnowledgeStore(run.knowledge).publish(v, {key: torch.full((4, 2), float(v))}, lora, {"round": v})
        if v:
            KnowledgeStore(run.edge_store("edge-0")).publish(v, {key: torch.ones(4, 2)}, lora, {"round": v})
        BaseStore(run.bases).publish(v, FakeModel(bytes([v]) * 64), TOKENIZER, {"round": v})
    refresh_model_dir(root, run.base_dir(rounds_started))
    (root / ".model-deadbeef").mkdir()  # a swap a kill interrupted
    run.metrics.write_text("".join(json.dumps({"round": r, "version": r}) + "\n" for r in range(1, rounds_done + 1)))
    return run


def test_resume_cuts_every_store_back_through_the_store_and_resets_model(tmp_path):
    from gaisnet_ray.runfolder import resume_run_dir

    run = _relay_run(tmp_path / "run", rounds_done=1, rounds_started=2)
    cfg, done = resume_run_dir(run.root)
    assert done == 1 and cfg.relay.policy == "merge"
    (stash,) = run.orphaned.iterdir()
    assert sorted(p.name for p in run.knowledge.iterdir() if p.name.startswith("v")) == ["v0000", "v0001"]
    assert BaseStore(run.bases).versions() == [0, 1]
    assert (stash / "knowledge" / "v0002").is_dir() and (stash / "knowledge" / "bases" / "b0002").is_dir()
    assert (stash / "knowledge" / "edges" / "edge-0" / "v0002").is_dir() and (stash / ".model-deadbeef").is_dir()
    assert [r["version"] for r in BaseStore(run.bases).history()] == [0, 1]
    assert (run.model / "model.safetensors").read_bytes() == b"\1" * 64  # model/ is the last complete round's base
    assert run.model_swaps() == []


def test_resume_refuses_a_damaged_version_it_would_continue_from(tmp_path):
    from gaisnet_ray.runfolder import RunFolderError, resume_run_dir

    run = _relay_run(tmp_path / "run", rounds_done=1, rounds_started=1)
    weights = run.base_dir(1) / "model.safetensors"
    weights.write_bytes(b"\7" * 64)  # same size, other bytes: caught by the deep check only
    with pytest.raises(RunFolderError, match=r"after round 1: bases/b0001: model.safetensors does not match"):
        resume_run_dir(run.root)
    assert BaseStore(run.bases).versions() == [0, 1]  # refused before anything was cut
    weights.write_bytes(b"\1" * 64)
    adapter = run.version_dir(0) / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-3])
    with pytest.raises(RunFolderError, match=r"after round 1: v0000: adapter_model.safetensors cannot be read"):
        resume_run_dir(run.root)


def test_inspect_lists_base_versions_and_flags_a_damaged_one(tmp_path, capsys):
    from gaisnet_ray.cli import main

    run = _relay_run(tmp_path / "run", rounds_done=1, rounds_started=1)
    (run.base_dir(1) / "model.safetensors").write_bytes(b"\1" * 10)
    assert main(["inspect", str(run.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "knowledge versions: v0000, v0001" in out
    assert out[-2:] == ["base versions: b0000, b0001 (model/ = b0001)",
                        "damaged: bases/b0001: model.safetensors has 10 bytes, not the 64 published"]
