"""What a piece of resumable state was computed from, as one record, and what changed since.

Every stage that keeps state across a killed job (train's checkpoint.pt, a sample set's parts/ and
images/, encode's latent chunks) stores a fingerprint beside it: the sha256 of every input file
(model, backbone, latents, autoencoder, ...), a digest of the training images
(core/data.dataset_digest) and the settings that affect the result. A rerun
resumes only when the fingerprint it would write equals the stored one, so a model retrained in
place with the same step count, or a backbone replaced at the same path, is never resumed over:
matching paths, steps and flags is not enough (issue 22).

On a mismatch `check_state` either refuses in one line naming what changed and `--restart` (the
command line: the user decides) or, with `--restart` (what the pipeline passes: Snakemake has
already decided the job must run), discards the state, logs the same line and lets the job run
afresh. Feature chunks need no record: their file names are themselves a hash of the network's
and the images' bytes (metrics/feature_cache.py), so another input is simply another chunk.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from duodiff.core.errors import DuodiffError
from duodiff.core.io import file_sha256

RESTART_HELP = (
    "discard resumable state made from other inputs or settings (named in one line) and start afresh; "
    "without it such state is refused. State from the same inputs is resumed either way"
)


def fingerprint(files: dict, settings: dict, digests: dict | None = None) -> dict:
    """{"files": {label: {"path", "sha256"}}, "settings": settings}. `files` maps a label that
    names the input for a person ("model weights", "backbone weights") to its path; None entries
    (an input this run does not have) are left out. `digests` maps a label to an input's
    (where, sha256) computed by its owner rather than read from one file: the training images
    (core/data.dataset_digest). They compare like files, by their sha256 only."""
    found = {label: {"path": str(path), "sha256": file_sha256(path)} for label, path in files.items() if path is not None}
    for label, (where, sha256) in (digests or {}).items():
        found[label] = {"path": str(where), "sha256": sha256}
    return {"files": found, "settings": settings}


def _setting_changes(name: str, old, new) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in _setting_changes(f"{name}.{key}", old.get(key), new.get(key))]  # fmt: skip
    return [] if old == new else [f"{name} {old!r} -> {new!r}"]


def changes(old: dict | None, new: dict) -> list[str]:
    """What differs between a stored fingerprint and the current one, each as a person reads it:
    "model weights (results/x/model.pt)", "--lr 0.001 -> 0.002", "--model-config.depth 2 -> 3".
    Files compare by content only: the same bytes at another path are the same input."""
    if not isinstance(old, dict) or not isinstance(old.get("files"), dict) or not isinstance(old.get("settings"), dict):
        return ["no fingerprint (written by an older duodiff or not by duodiff)"]
    found = []
    for label in sorted(set(old["files"]) | set(new["files"])):
        before, now = old["files"].get(label), new["files"].get(label)
        if before is None:
            found.append(f"{label} added ({now['path']})")
        elif now is None:
            found.append(f"{label} no longer used (was {before['path']})")
        elif before["sha256"] != now["sha256"]:
            found.append(f"{label} ({now['path']})")
    for key in sorted(set(old["settings"]) | set(new["settings"])):
        found += _setting_changes(f"--{key.replace('_', '-')}", old["settings"].get(key), new["settings"].get(key))
    return found


def check_state(old: dict | None, new: dict, state: str, restart: bool, discard: Callable[[], None]) -> bool:
    """True when `state` (e.g. "checkpoint.pt in runs/full") was made from the same inputs: resume
    it. Else, without `restart`: DuodiffError naming what changed and --restart; with it: print
    one line naming what changed, call `discard` and return False (the job runs afresh)."""
    what = changes(old, new)
    if not what:
        return True
    said = "; ".join(what)
    if not restart:
        raise DuodiffError(
            f"{state} was made from other inputs or settings ({said}); rerun with --restart to discard it and start "
            "afresh, or rerun with the inputs it was made from to resume it"
        )
    print(f"duodiff: discarding {state}, made from other inputs or settings ({said}); starting afresh", flush=True)
    discard()
    return False


def remove_files(*paths) -> Callable[[], None]:
    """A `discard` for check_state: delete these files and folders (missing ones are fine)."""
    def discard() -> None:
        for path in map(Path, paths):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    return discard
