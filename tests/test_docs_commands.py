"""Every command in the README and in docs/*.md works from the wheel: this test runs or checks
each one, so the manual cannot drift from the code.

The convention a page follows (any page under docs/, new ones included; nothing to register):

- A command is a line of a ```bash block that starts, at its first column, with ``ismctl``,
  ``torchrun``, ``make`` or ``python -m``; a line ending in ``\\`` continues on the next, and
  ``# ...`` is a comment. Indented lines (loop bodies, scripts) are not commands. No line of a
  ```bash block may name ``recipes/``: a wheel has no such folder, so name a shipped recipe
  (``ismctl recipe list``) instead.
- Each page's commands run in order in a scratch folder of their own, which already holds the
  built-in digits (``data/digits``) and a short quickstart run (``runs/quickstart``, evaluated
  at 1 and 4 steps into ``fixture/``, so ``--guidance best`` has a remembered w there).
  Relative paths mean that folder.
- How a command is checked:
  - run, and it must exit 0: ``ismctl recipe ...``, ``ismctl docs ...``, ``--help``,
    ``--version``, ``prepare-latents digits``, and ``sample``, ``eval``, ``export``, ``data
    check`` of a folder the scratch folder holds. Keep these small (a few hundred samples at
    1-4 steps): they run in every ``make test``. An ``eval`` of ``runs/quickstart`` needs its
    own ``--out`` unless it evaluates what the fixture did (one evaluation per results file).
  - ``ismctl train`` runs with ``--dry-run`` (and ``--overwrite`` unless it resumes, since the
    scratch folder holds ``runs/quickstart``) when its recipe's data is in the scratch folder
    and it launches nothing elsewhere (no ``--launch``).
  - every other ``ismctl`` command (ImageNet data, runs that do not exist here, ``--launch``,
    ``ablate``, ``bench``, and anything under ``torchrun``) is parsed, not run: its options
    must be valid, and the recipe it names must load with its ``--set`` overrides (for
    ``ablate``, its ``--disable`` components and ``--sweep`` values too). torchrun's own
    options go through torchrun's parser.
  - ``make TARGET``: TARGET must be a target of the Makefile (``make -n``); ``python -m
    MODULE ...``: MODULE must run ``--help``.

Cost: about a minute on one core (the fixture run, then mostly the commands that really run).
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STARTS = ("ismctl", "torchrun", "make", "python -m")
# Commands run for real when what they read is in the scratch folder (see the docstring).
RUN_ON_FOLDER = {"sample": "run", "eval": "run", "export": "run", "check": "folder"}


def bash_lines(text: str) -> list[str]:
    """Every line inside the page's ```bash blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash" if not inside else False
            continue
        if inside:
            lines.append(line)
    return lines


def commands(text: str) -> list[str]:
    """The page's commands, continuation lines joined."""
    out: list[str] = []
    lines = bash_lines(text)
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith(STARTS):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        out.append(line)
    return out


def test_commands_are_found() -> None:
    """The parser itself: blocks, continuations, comments and indented lines."""
    page = ("text\n```bash\nismctl train quickstart \\\n    --set a=1   # note\n"
            "for s in 0 1; do\n  ismctl eval x$s\ndone\nmake demo\n```\n"
            "```python\nismctl = 1\n```\n")
    found = commands(page)
    assert found == ["ismctl train quickstart  --set a=1   # note", "make demo"]
    assert shlex.split(found[0], comments=True) == ["ismctl", "train", "quickstart",
                                                     "--set", "a=1"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scratch folder every page starts from: the digits and a 20-step quickstart run,
    evaluated at 1 and 4 steps (the inference EMA's best w remembered)."""
    import os

    from ismctl.cli import main

    root = tmp_path_factory.mktemp("docs-template")
    here = Path.cwd()
    os.chdir(root)
    try:
        for args in (
            ["prepare-latents", "digits", "--out", "data/digits"],
            ["train", "quickstart", "--set", "train.steps=20", "--set", "run.ckpt_every=20",
             "--set", "run.sample_every=20", "--set", "run.log_every=10",
             "--set", "run.tracker=none", "--no-progress"],
            ["eval", "runs/quickstart", "--steps", "1,4", "--guidance", "0,0.5",
             "--num-samples", "50", "--remember", "--out", "fixture/results.json"],
        ):
            assert _main(main, args) == 0, args
    finally:
        os.chdir(here)
    return root


def _main(main: Callable[[], None], args: list[str]) -> int:
    import torch

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["ismctl", *args]
    try:
        main()
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return 0


def parse_ismctl(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``ismctl ARGS`` exactly as the command line does, without running the command:
    returns its name (``recipe show``: ``show``; empty for ``--help`` or a group alone) and its
    parameters (raises click's error for a bad option or value)."""
    import typer

    from ismctl.cli import app

    group = typer.main.get_command(app)
    words = [a for a in args if not a.startswith("-")]
    command: Any = group
    for word in words:
        if not hasattr(command, "commands") or word not in command.commands:
            break
        command = command.commands[word]
    if hasattr(command, "commands"):
        group.main(args=args, prog_name="ismctl", standalone_mode=False)
        return "", {}
    seen: list[dict[str, Any]] = []
    original = command.callback
    command.callback = lambda **params: seen.append(params)
    try:
        group.main(args=args, prog_name="ismctl", standalone_mode=False)
    finally:
        command.callback = original
    return (command.name, seen[0]) if seen else ("", {})


@functools.cache
def make_target_ok(target: str) -> bool:
    return subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True).returncode == 0


@functools.cache
def module_help_ok(module: str) -> bool:
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                          capture_output=True).returncode == 0


def check_recipe(params: dict[str, Any], default: str | None = None) -> Any:
    """The recipe a command names loads (a shipped name, or a file in the scratch folder)
    with its --set overrides."""
    from ismctl.config.recipe import load_recipe

    recipe = params.get("recipe") or default
    return None if recipe is None else load_recipe(recipe, params.get("set_"))


def check_command(line: str, run: Callable[[list[str]], int]) -> str | None:
    """Run or check one command (in the current folder, the scratch folder); None if it
    passes, else what went wrong."""
    words = shlex.split(line, comments=True)
    if words[0] == "make":
        ok = all(make_target_ok(t) for t in words[1:] if "=" not in t)
        return None if ok else "not a make target"
    if words[:2] == ["python", "-m"]:
        return None if module_help_ok(words[2]) else f"python -m {words[2]} --help failed"
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        try:
            parsed = get_args_parser().parse_args(words[1:])
        except SystemExit:
            return "torchrun rejects its options"
        if not (parsed.module and parsed.training_script == "ismctl"):
            return "torchrun must run -m ismctl"
        words = ["ismctl", *parsed.training_script_args]
        parse_only = True
    else:
        parse_only = False
    args = words[1:]
    try:
        name, params = parse_ismctl(args)
        if name in ("train", "ablate", "show"):
            recipe = check_recipe(params, "ism_xl" if name == "ablate" else None)
        if name == "ablate":
            from ismctl.tools.ablate import parse_components, plan_sweep

            parse_components(params["disable"])
            if params["sweep"] is not None:
                plan_sweep(recipe, params["sweep"])
        if parse_only:
            return None
        if name == "train":
            if params.get("launch") or not Path(recipe.data.path).exists():
                return None
            resumes = params["resume"] or params["auto_resume"] or params["overwrite"]
            args = [*args, *([] if params["dry_run"] else ["--dry-run"]),
                    *([] if resumes else ["--overwrite"])]
        elif name == "prepare-latents" and params["src"] != "digits":
            return None
        elif name in RUN_ON_FOLDER:
            target = params[RUN_ON_FOLDER[name]]
            if target is not None and not Path(target).exists():
                return None
        elif name in ("ablate", "bench"):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the finding
        return f"{type(exc).__name__}: {exc}"
    code = run(args)
    return None if code == 0 else f"exit code {code}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_page_commands(page: Path, template: Path, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    from ismctl.cli import main

    text = page.read_text(encoding="utf-8")
    named = [line for line in bash_lines(text) if "recipes/" in line]
    assert not named, f"{page.name}: commands name recipes/ (a wheel has none): {named}"
    scratch = tmp_path / "scratch"
    shutil.copytree(template, scratch, symlinks=True)
    monkeypatch.chdir(scratch)
    failures = []
    for line in commands(text):
        problem = check_command(line, lambda args: _main(main, args))
        output = capsys.readouterr()
        if problem is not None:
            failures.append(f"{line}\n    {problem}\n    {output.err.strip()[-500:]}")
    assert not failures, f"{page.name}:\n" + "\n".join(failures)
