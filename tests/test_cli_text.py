"""User text reaches the terminal as written: brackets in paths, values and messages are not
read as rich markup (``'ismctl[fid]'`` stays ``'ismctl[fid]'``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import ismctl.cli as cli
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def test_a_set_value_with_brackets_is_echoed_as_given(
        ismctl_main: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("train", QUICK, "--set", "optim.betas=[bold]", "--dry-run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set optim.betas=[bold]: optim.betas"), err


def test_an_error_message_keeps_its_brackets(
        ismctl_main: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def keys(*args: object, **kwargs: object) -> None:
        raise UserError("fid: needs the optional packages; pip install 'ismctl[fid]' "
                        "([bold]not markup[/bold])")

    monkeypatch.setattr("ismctl.tools.recipe_info.print_keys", keys)
    assert ismctl_main("recipe", "keys") == 2
    err = capsys.readouterr().err
    assert "pip install 'ismctl[fid]' ([bold]not markup[/bold])" in err, err
    assert cli.escape("[x]") == "\\[x]"
