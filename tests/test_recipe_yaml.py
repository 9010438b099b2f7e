"""A key given twice in one mapping is an error with its line, in a recipe file and in a
--set value; merge keys may still be overridden."""

from __future__ import annotations

from pathlib import Path

import pytest

from ismctl.config.recipe import load_recipe
from ismctl.utils.errors import UserError
from ismctl.utils.yamlio import safe_load_unique


def test_a_repeated_field_is_refused_with_its_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-4\n  eps: 1.0e-8\n  lr: 2.0e-4\n")
    with pytest.raises(UserError) as err:
        load_recipe(recipe)
    assert str(err.value) == (f"{recipe.resolve()}:4:3: not valid YAML (duplicate key 'lr', "
                              "first set on line 2)")


def test_a_repeated_section_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 1.0e-4}\nmodel: {preset: S/2}\noptim: {eps: 1.0e-8}\n")
    with pytest.raises(UserError, match=r":3:1: not valid YAML \(duplicate key 'optim'"):
        load_recipe(recipe)


def test_a_repeated_key_in_a_set_value_is_refused() -> None:
    with pytest.raises(UserError, match="--set 'optim={lr: 1, lr: 2}': value is not valid YAML"):
        load_recipe(None, ["optim={lr: 1, lr: 2}"])


def test_merge_keys_may_be_overridden_and_plain_yaml_reads_as_before() -> None:
    text = "base: &b {lr: 1, eps: 2}\nchild:\n  <<: *b\n  lr: 3\nlist: [1, 1]\n"
    assert safe_load_unique(text) == {"base": {"lr": 1, "eps": 2}, "child": {"lr": 3, "eps": 2},
                                      "list": [1, 1]}
