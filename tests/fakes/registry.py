"""An in-memory `Registry` for flow unit tests: the real alias rules and the real verified cache, no MLflow.

Versions live in a dict; each registered adapter is copied into `root/store/<track>/v<N>/` (the
"artifact store"), so tests can tamper with a stored copy exactly as with MLflow's. Alias moves,
tag rules and the fetch cache are the functions `pipeline.register.registry` uses, so the fake cannot drift
from the real registry on them; `tests/unit/test_registry.py` runs the same contract tests on both.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from pipeline.adapters import AdapterVersion, adapter_sha256, check_adapter_dir
from pipeline.register.registry import (
    ALIASES,
    CHALLENGER,
    CHAMPION,
    SHA_TAG,
    RegistryError,
    VersionInfo,
    cached_adapter,
    check_track_name,
    parse_version_or_alias,
    promoted,
    registration_tags,
    rolled_back,
)


class FakeRegistry:
    """`pipeline.register.registry.Registry` in memory, with adapters copied under `root`."""

    def __init__(self, root: Path, *, cache_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / "cache"
        self._versions: dict[str, list[VersionInfo]] = {}
        self._aliases: dict[str, dict[str, int]] = {}

    def stored_path(self, track: str, version: int) -> Path:
        """Where the "artifact store" keeps a version's adapter."""
        return self.root / "store" / track / f"v{version}"

    def register(self, track: str, adapter_dir: Path, *, run_id: str | None, tags: Mapping[str, str]) -> int:
        check_track_name(track)
        check_adapter_dir(adapter_dir)
        sha256 = adapter_sha256(Path(adapter_dir))
        versions = self._versions.setdefault(track, [])
        version = len(versions) + 1
        shutil.copytree(adapter_dir, self.stored_path(track, version))
        parent = self.version_for(track, CHAMPION)
        info = VersionInfo(
            track=track,
            version=version,
            aliases=(),
            tags=registration_tags(track, tags, sha256=sha256, parent=parent),
            run_id=run_id,
            created_at=datetime.now(UTC),
        )
        versions.append(info)
        self._aliases.setdefault(track, {})[CHALLENGER] = version
        return version

    def versions(self, track: str) -> list[VersionInfo]:
        aliases = self._aliases.get(track, {})
        return [
            VersionInfo(
                track=info.track,
                version=info.version,
                aliases=tuple(alias for alias in ALIASES if aliases.get(alias) == info.version),
                tags=dict(info.tags),
                run_id=info.run_id,
                created_at=info.created_at,
            )
            for info in self._versions.get(track, [])
        ]

    def version_for(self, track: str, alias: str) -> int | None:
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")
        return self._aliases.get(track, {}).get(alias)

    def promote(self, track: str, version: int) -> None:
        self._info(track, version)
        self._aliases[track] = promoted(self._aliases.get(track, {}), version)

    def rollback_aliases(self, track: str, to_version: int) -> None:
        self._info(track, to_version)
        self._aliases[track] = rolled_back(self._aliases.get(track, {}), to_version)

    def fetch(self, track: str, version_or_alias: int | str) -> AdapterVersion:
        wanted = parse_version_or_alias(version_or_alias)
        if isinstance(wanted, str):
            version = self.version_for(track, wanted)
            if version is None:
                raise RegistryError(f"{track}: no {wanted} version (alias {wanted!r} is not set)")
        else:
            version = wanted
        sha256 = self._info(track, version).tags[SHA_TAG]

        def download(scratch: Path) -> Path:
            return Path(shutil.copytree(self.stored_path(track, version), scratch / "adapter"))

        return cached_adapter(self.cache_dir, track, version, sha256, download)

    def _info(self, track: str, version: int) -> VersionInfo:
        for info in self._versions.get(track, []):
            if info.version == version:
                return info
        raise RegistryError(f"{track}: no version {version}")
