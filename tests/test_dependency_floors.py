"""The dependency ranges pyproject.toml claims are the ones CI tests, and what older releases
lack is said where it is used."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(>=|==)\s*([^\s,;]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _claimed() -> dict[str, str]:
    """Core and dev requirements of pyproject.toml: name -> minimum (or exact pin)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    for req in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        match = REQUIREMENT.match(req)
        assert match, f"{req}: state a minimum (name>=version) or a pin (name==version)"
        out[_norm(match[1])] = match[3]
    return out


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not an exact pin"
            pins[_norm(pkg)] = version.strip()
    return pins


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:4])


def test_every_minimum_is_what_the_floor_environment_installs() -> None:
    floors = _pins("constraints-min.txt")
    for name, minimum in _claimed().items():
        assert floors.get(name) == minimum, (
            f"pyproject.toml claims {name}>={minimum}; constraints-min.txt pins "
            f"{floors.get(name)}")


def test_the_tested_environment_meets_the_minimums() -> None:
    current = _pins("constraints.txt")
    for name, minimum in _claimed().items():
        assert name in current, f"{name} is not in constraints.txt"
        assert _version(current[name]) >= _version(minimum), name
    # The floor is a real floor: torch's minimum is older than the release CI tests.
    assert _version(_claimed()["torch"]) < _version(current["torch"])


def test_the_readme_states_the_supported_torch_range() -> None:
    floor = _claimed()["torch"]
    assert f"torch {floor}" in (REPO / "README.md").read_text()


def test_jvp_attention_on_an_old_torch_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.system.runtime import math_attention

    with math_attention():  # this torch has it
        pass
    # torch < 2.3 has no torch.nn.attention: importing it fails.
    monkeypatch.setitem(sys.modules, "torch.nn.attention", None)
    with pytest.raises(UserError, match=r"needs torch >= 2\.3 \(this is torch "):
        math_attention()


def test_pt_checkpoint_on_an_old_torch_is_one_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.networks.pretrained import read_pretrained

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert read_pretrained(path)[0].keys() == {"w"}
    # torch < 2.4: neither way to allow argparse namespaces in a weights-only load.
    for name in ("safe_globals", "add_safe_globals"):
        monkeypatch.delattr(torch.serialization, name, raising=False)
    with pytest.raises(UserError, match=r"model.init_from .*weights\.pt: reading a checkpoint "
                                        r".*needs torch >= 2\.4 \(this is torch "):
        read_pretrained(path)


def test_diffusers_that_does_not_import_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.data.encoders import load_encoder

    # The newest diffusers on an older torch fails inside its import (an AttributeError on
    # torch 2.4 with diffusers 0.42): stand in with a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UserError, match=r"VAE encoder needs diffusers.*does not import with "
                                        r"torch .*diffusers<0\.37"):
        load_encoder("stabilityai/sd-vae-ft-mse")
