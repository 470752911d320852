"""requirements.lock against pyproject.toml: every declared dependency (extras included) is pinned, and its pin lies
in the declared range, so `pip install -c requirements.lock -e '.[all]'` installs exactly the tested set. Regenerate
with scripts/lock.sh."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def lock_pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line)
        if m:
            pins[canonicalize_name(m[1])] = Version(m[2])
        else:
            assert not line or line[0] in " #", f"requirements.lock: not a plain pin: {line!r}"  # no paths, URLs
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def test_lock_pins_every_declared_dependency_within_its_range():
    pins = lock_pins()
    reqs = declared()
    assert len(reqs) >= 20
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, not {req}"


def test_no_exact_pins_in_the_package_metadata():
    """Ranges in [project], exact versions only in the lock; torch's build (+cpu) is an install detail."""
    for req in declared():
        assert not any(s.operator in ("==", "===") for s in req.specifier), str(req)
    assert lock_pins()["torch"].local is None
