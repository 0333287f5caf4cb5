"""The locks in requirements/ against pyproject.toml: every dependency an install asks for
has an entry in its lock that fits the range, with hashes (make lock after a change)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "requirements"))
from lock import LOCKS, WITH_TORCH  # noqa: E402

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def lock_entries(name: str) -> dict[str, list[tuple[Version, str, int]]]:
    """name -> [(version, marker, hashes)] of a lock file."""
    entries: dict[str, list[tuple[Version, str, int]]] = {}
    text = (ROOT / "requirements" / name).read_text()
    for block in re.split(r"\n(?=\S)", text):
        first = block.splitlines()[0]
        if first.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]+))?", first)
        assert m, f"{name}: not an exact pin: {first!r}"
        entries.setdefault(canonicalize_name(m[1]), []).append(
            (Version(m[2]), (m[3] or "").strip(), block.count("--hash=sha256:"))
        )
    return entries


def requirements_of(extras: list[str]) -> list[Requirement]:
    """The project's dependencies with `extras`, following self-references."""
    wanted, seen, out = list(extras), set(), [Requirement(r) for r in PROJECT["dependencies"]]
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in PROJECT["optional-dependencies"][extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "embedsvc":
                wanted.extend(req.extras)
            else:
                out.append(req)
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_dependency_is_locked_at_a_version_in_range_with_hashes(lock: str) -> None:
    entries = lock_entries(lock)
    assert entries, lock
    for name, pins in entries.items():
        assert not WITH_TORCH.match(name), f"{lock} pins {name}, which comes with torch"
        for version, _, hashes in pins:
            assert hashes >= 1, f"{lock}: {name}=={version} has no hash"
    for req in requirements_of(LOCKS[lock]):
        name = canonicalize_name(req.name)
        if WITH_TORCH.match(name):
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        pins = [
            v for v, marker, _ in entries.get(name, []) if not marker or Marker(marker).evaluate()
        ]
        assert pins, f"{lock} has no entry for {req} (run make lock)"
        for version in pins:
            assert req.specifier.contains(version, prereleases=True), (
                f"{lock} pins {name}=={version}, outside {req} (run make lock)"
            )


def test_torch_is_pinned_exactly_and_within_the_project_range() -> None:
    [line] = [
        ln for ln in (ROOT / "requirements/torch.txt").read_text().splitlines() if ln[:1].isalpha()
    ]
    pin = Requirement(line)
    [version] = [s.version for s in pin.specifier if s.operator == "=="]
    [torch] = [Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch")]
    assert torch.specifier.contains(version)
