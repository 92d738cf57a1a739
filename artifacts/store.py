"""The artifact store: every stage output is a directory keyed by what produced it.

Layout under the run directory::

    RUN/<stage>/<key>/manifest.json   written last; its presence means "complete"
    RUN/<stage>/<key>/<files...>      the stage's tables, tensors, model files
    RUN/.tmp/                         directories being built; never read, wiped on start
    RUN/.work/<stage>-<key>/          checkpoints of long builds; kept across kills

A key hashes (stage name, stage VERSION, canonical config, upstream digests), so a
re-run finds finished work by recomputing keys: no database, no Prefect cache.  An
artifact's *digest* hashes its files' contents only, so a recomputed-but-identical
upstream does not invalidate anything downstream.  Every lookup checks the files against
the manifest's digests (re-reading only files whose size or modification time changed since
they were last hashed; ``verify`` re-reads everything); a corrupted artifact is deleted and
rebuilt, with a warning.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonsai.artifacts.digest import DigestCache, canonical_json, file_digest, text_digest, value_digest
from bonsai.artifacts.faults import kill_point

MANIFEST = "manifest.json"
DIGESTS = ".digests.json"  # the store's DigestCache
FORMAT = 1

log = logging.getLogger("bonsai.store")


@dataclass(frozen=True)
class ArtifactRef:
    """What flows between stages: a small, picklable pointer, never a tensor or a model."""

    stage: str
    key: str
    path: str
    digest: str

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def manifest(self) -> dict:
        return json.loads(self.file(MANIFEST).read_text())

    def info(self) -> dict:
        """The small JSON summary the stage returned when it built this artifact."""
        return self.manifest().get("info", {})


def external_ref(stage: str, path: str | os.PathLike, digest: str) -> ArtifactRef:
    """A ref to something outside the store (the parent model, a data source)."""
    return ArtifactRef(stage=stage, key=digest[:20], path=str(Path(path).resolve()), digest=digest)


# the libraries whose version can change a stage's numbers or bytes, recorded in every manifest
# (distribution name -> the name manifests use); the first three are checked on resume
LIBRARIES = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
             "polars": "polars", "scikit-learn": "sklearn", "numpy": "numpy"}  # fmt: skip
RESUME_CHECKED = ("torch", "transformers", "safetensors")


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for distribution, name in LIBRARIES.items():
        try:
            out[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def library_versions() -> dict[str, str]:
    """This process's versions (read once from the installed metadata: nothing is imported)."""
    return dict(_installed_versions())


def library_changes(recorded: Mapping[str, Mapping[str, str]], now: Mapping[str, str]) -> dict[str, list[str]]:
    """Per library of RESUME_CHECKED, the versions artifacts were made with that differ from
    ``now`` (artifacts from before the library was recorded are not counted)."""
    changes: dict[str, set[str]] = {}
    for libraries in recorded.values():
        for name in RESUME_CHECKED:
            if name in libraries and name in now and libraries[name] != now[name]:
                changes.setdefault(name, set()).add(libraries[name])
    return {name: sorted(versions) for name, versions in changes.items()}


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.digests = DigestCache(self.root / DIGESTS)

    def __getstate__(self) -> dict:  # a store travels to Dask workers as its root alone
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # keys -------------------------------------------------------------------------------
    def key(self, stage: str, version: str, config: Any, inputs: Sequence[ArtifactRef]) -> str:
        upstream = [(r.stage, r.digest) for r in inputs]
        return value_digest([stage, version, config, upstream])[:20]

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    # lookup -----------------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The finished artifact, or None.  Corrupted ones are removed (with a warning)."""
        where = self.path(stage, key)
        manifest_path = where / MANIFEST
        if not manifest_path.is_file():
            return None
        problem = self._verify(where)
        if problem is not None:
            log.warning("artifact %s/%s is corrupted (%s); recomputing it", stage, key, problem)
            shutil.rmtree(where, ignore_errors=True)
            return None
        manifest = json.loads(manifest_path.read_text())
        return ArtifactRef(stage=stage, key=key, path=str(where), digest=manifest["digest"])

    def lineage(self, stage: str, key: str) -> set[tuple[str, str]]:
        """(stage, key) of the artifact and of every artifact of this store it was built from,
        read from the manifests' inputs: what a finished run's result actually rests on, as
        opposed to work an earlier version of a stage left in the same directory."""
        seen: set[tuple[str, str]] = set()
        todo = [(stage, key)]
        while todo:
            node = todo.pop()
            manifest_path = self.path(*node) / MANIFEST
            if node in seen or not manifest_path.is_file():
                continue  # external inputs (the parent model, the data) live outside the store
            seen.add(node)
            todo.extend((i["stage"], i["key"]) for i in json.loads(manifest_path.read_text())["inputs"])
        return seen

    def library_versions(self) -> dict[str, dict]:
        """Per finished artifact (``stage/key``), the library versions its manifest records."""
        out = {}
        for manifest in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            try:
                recorded = json.loads(manifest.read_text()).get("libraries", {})
            except (OSError, ValueError):
                continue  # a corrupted manifest: its lookup rebuilds it
            out[manifest.parent.relative_to(self.root).as_posix()] = recorded
        return out

    def _verify(self, where: Path, digests: DigestCache | None = None) -> str | None:
        digests = digests or self.digests
        try:
            manifest = json.loads((where / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as exc:
            return f"unreadable manifest: {exc.__class__.__name__}"
        try:
            for name, expected in files.items():
                target = where / name
                if not target.is_file():
                    return f"{name} is missing"
                if target.stat().st_size != expected["bytes"] or digests.digest(target) != expected["sha256"]:
                    return f"{name}: digest mismatch"
        finally:
            digests.save()
        if _content_digest(files) != manifest.get("digest"):
            return "manifest digest mismatch"
        return None

    def verify(self) -> tuple[int, list[tuple[str, str]]]:
        """Re-read every file of every finished artifact: (artifacts checked, [(artifact,
        problem)]).  The refreshed digests make the next lookup of a corrupted artifact
        rebuild it."""
        fresh = DigestCache(self.root / DIGESTS, fresh=True)
        manifests = sorted(self.root.glob(f"*/*/{MANIFEST}"))
        problems = []
        for manifest in manifests:
            problem = self._verify(manifest.parent, fresh)
            if problem is not None:
                problems.append((manifest.parent.relative_to(self.root).as_posix(), problem))
        self.digests = DigestCache(self.root / DIGESTS)
        return len(manifests), problems

    # build ------------------------------------------------------------------------------
    def produce(
        self,
        stage: str,
        version: str,
        config: Any,
        inputs: Sequence[ArtifactRef],
        build: Callable[[Path], Mapping[str, Any] | None],
    ) -> ArtifactRef:
        """Return the artifact for (stage, version, config, inputs), building it if needed.

        ``build(tmp_dir)`` writes the stage's files into an empty directory and may return
        a small JSON-able dict kept in the manifest as ``info``.  The directory is renamed
        into place only after the manifest is written: a killed build leaves nothing that
        a later lookup would read.
        """
        key = self.key(stage, version, config, inputs)
        found = self.lookup(stage, key)
        if found is not None:
            return found
        tmp = self.root / ".tmp" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        started = time.time()
        try:
            info = dict(build(tmp) or {})
            files = {
                p.relative_to(tmp).as_posix(): {"sha256": file_digest(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            manifest = {
                "format": FORMAT,
                "stage": stage,
                "version": version,
                "key": key,
                "config": json.loads(canonical_json(config)),
                "inputs": [{"stage": r.stage, "key": r.key, "digest": r.digest} for r in inputs],
                "files": files,
                "digest": _content_digest(files),
                "info": json.loads(canonical_json(info)),
                "libraries": library_versions(),
                "wall_s": round(time.time() - started, 3),
                # the process's peak resident memory so far (a stage that raises it is the culprit)
                "peak_rss_mb": round(_peak_rss_mb(), 1),
            }
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            kill_point("commit")  # complete but not yet renamed into place: never read
            final = self.path(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                done = self.lookup(stage, key)
                if done is not None:  # another process finished the same work first
                    shutil.rmtree(tmp, ignore_errors=True)
                    return done
                shutil.rmtree(final, ignore_errors=True)  # a leftover without a valid manifest
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ArtifactRef(stage=stage, key=key, path=str(final), digest=manifest["digest"])

    def workdir(self, stage: str, key: str) -> Path:
        """Scratch that survives kills (checkpoints of a long build), unlike ``.tmp``.
        The stage removes it once its artifact is complete."""
        where = self.root / ".work" / f"{stage}-{key}"
        where.mkdir(parents=True, exist_ok=True)
        return where

    def clear_partial(self) -> int:
        """Remove directories left by killed builds.  Call only while holding the run lock."""
        tmp = self.root / ".tmp"
        if not tmp.is_dir():
            return 0
        stale = list(tmp.iterdir())
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return len(stale)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _content_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    return text_digest(canonical_json({name: meta["sha256"] for name, meta in files.items()}))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
