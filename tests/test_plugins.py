"""Objectives as plugins (ismctl.config.plugins, docs/extending.md): ismctl's own come from its
entry points, a module named in the recipe registers its own, the recipe checks the mode and the
mode's settings, the declared needs and sampling protocol are what the rest of ismctl obeys."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ismctl.config.plugins import (
    ENTRY_POINT_GROUP,
    Lazy,
    Needs,
    ObjectiveSpec,
    Sampling,
    available_objectives,
    get_objective,
    register_objective,
)
from ismctl.config.recipe import ObjectiveCfg, load_recipe, recipe_from_dict
from ismctl.objectives import builtin
from ismctl.sampling.protocol import Point, plan_points, run_sampler
from ismctl.sampling.sampler import sample
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TOY = str(REPO / "tests" / "plugins" / "toy_flow.py")
OURS = {"sm": builtin.SM, "ism": builtin.ISM, "meanflow": builtin.MEANFLOW}
# Objectives registered here do not outlive the test (the registry is per process).
pytestmark = pytest.mark.usefixtures("plugin_registry")


def test_ismctl_s_own_objectives_are_its_entry_points() -> None:
    """sm, ism and meanflow enter the registry the way a package's objective does: through the
    entry points of ismctl's installed metadata, not by being imported."""
    ours = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.dist is not None and ep.dist.name == "ismctl"}
    assert set(ours) == set(OURS)
    for name, ep in ours.items():
        assert ep.load() is OURS[name]
        assert get_objective(name) is OURS[name]
    assert set(OURS) <= set(available_objectives())


def test_reading_a_recipe_imports_no_torch() -> None:
    """The entry points point at declarations whose losses are imported on first call, so the
    recipe commands stay light."""
    code = ("import sys; from ismctl.config.recipe import load_recipe; "
            "[load_recipe(r) for r in ('quickstart', 'sm_quickstart', 'meanflow_digits')]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_lazy_losses_are_the_functions_they_name() -> None:
    from ismctl.objectives import meanflow, shortcut

    assert builtin.SM.fn.resolve() is shortcut.sm_loss
    assert builtin.ISM.fn.resolve() is shortcut.ism_loss
    assert builtin.MEANFLOW.fn.resolve() is meanflow.meanflow_loss
    assert builtin.MEANFLOW.target_passes.resolve() is meanflow.target_passes
    with pytest.raises(ValueError, match="module:attribute"):
        Lazy("no_colon")


def test_an_unknown_mode_names_the_closest_and_every_registered_one() -> None:
    with pytest.raises(UserError) as err:
        load_recipe("quickstart", ["objective.mode=meanflw"])
    text = str(err.value)
    assert "objective.mode: unknown objective 'meanflw' (did you mean 'meanflow'?)" in text
    assert "registered: " in text and all(name in text for name in OURS)
    assert "(and" not in text   # one error: the mode's, not the keys it does not know


def test_a_plugin_module_registers_its_objective_and_its_settings() -> None:
    recipe = load_recipe("quickstart", ["objective.mode=toy-flow", "objective.weight=2",
                                        "ema.target_enabled=false"], plugins=[TOY])
    obj = recipe.objective
    assert type(obj).__name__ == "ToyFlowSettings" and obj.weight == 2.0
    assert obj.plugins == [TOY]
    # ism's settings, inherited from the quickstart, are gone with the switch to another model;
    # the keys every objective has stay.
    assert obj.base_steps == 128 and not hasattr(obj, "guidance_fraction")
    dumped = recipe.model_dump(mode="json")["objective"]
    assert dumped == {"mode": "toy-flow", "base_steps": 128, "plugins": [TOY],
                      "label_drop": 0.0, "weight": 2.0}
    # The saved recipe reads back (sample, eval, export and resume read it).
    again = recipe_from_dict(json.loads(json.dumps(recipe.model_dump(mode="json"))))
    assert again == recipe
    with pytest.raises(UserError, match=r"objective\.weigth: unknown key \(did you mean "
                                        r"objective\.weight\?\)"):
        load_recipe("quickstart", ["ema.target_enabled=false", "objective.mode=toy-flow",
                                   "objective.weigth=2"], plugins=[TOY])
    with pytest.raises(UserError, match=r"objective\.weight: Input should be greater than 0"):
        load_recipe("quickstart", ["ema.target_enabled=false", "objective.mode=toy-flow",
                                   "objective.weight=0"], plugins=[TOY])


def test_the_needs_are_checked_against_the_recipe() -> None:
    with pytest.raises(UserError, match="ema.target_enabled: objective 'toy-flow' builds no "
                                        "targets with a network"):
        load_recipe("quickstart", ["objective.mode=toy-flow"], plugins=[TOY])
    spec = ObjectiveSpec(name="needs-ema", fn=lambda *a: {}, jump_embedding="table",
                         settings=ObjectiveCfg, sampling=builtin._ism_sampling,
                         target_passes=lambda o, g: 0.0, needs=Needs(target_ema=True))
    register_objective(spec)
    assert load_recipe("quickstart", ["objective.mode=needs-ema"]).ema.target_enabled
    with pytest.raises(UserError, match="builds its targets with an EMA"):
        load_recipe("quickstart", ["objective.mode=needs-ema", "ema.target_enabled=false"])


def test_settings_models_stay_with_their_mode() -> None:
    """A shipped objective's recipe that names another shipped mode keeps the shared keys
    (sm_quickstart extends the quickstart); a model built for another mode is refused."""
    sm = load_recipe("sm_quickstart")
    assert sm.objective.mode == "sm" and sm.objective.bootstrap_fraction == 0.125
    with pytest.raises(ValueError, match="takes its settings from"):
        ObjectiveCfg(mode="toy-flow", plugins=[TOY])


def test_registering_another_objective_under_a_taken_name_is_refused(plugin_registry) -> None:
    """Taken by an installed package (loaded or not yet) or by an earlier registration."""
    plugin_registry._REGISTRY.pop("sm", None)   # not loaded yet: its entry point still holds it
    def other(name: str) -> ObjectiveSpec:
        return ObjectiveSpec(name=name, fn=lambda *a: {}, jump_embedding="table",
                             settings=ObjectiveCfg, sampling=builtin._sm_sampling,
                             target_passes=lambda o, g: 0.0)

    with pytest.raises(ValueError, match="'sm' is declared by the installed 'sm = ismctl."
                                         "objectives.builtin:SM' of ismctl"):
        register_objective(other("sm"))
    assert register_objective(builtin.SM) is builtin.SM   # the same spec again: nothing
    assert get_objective("sm") is builtin.SM
    register_objective(other("first-come"))
    with pytest.raises(ValueError, match="'first-come' is already registered"):
        register_objective(other("first-come"))
    with pytest.raises(ValueError, match="jump_embedding"):
        register_objective(ObjectiveSpec(
            name="odd", fn=lambda *a: {}, jump_embedding="dyadic", settings=ObjectiveCfg,
            sampling=builtin._sm_sampling, target_passes=lambda o, g: 0.0))
    with pytest.raises(TypeError, match="ObjectiveBase"):
        register_objective(ObjectiveSpec(
            name="odd", fn=lambda *a: {}, jump_embedding="table", settings=dict,
            sampling=builtin._sm_sampling, target_passes=lambda o, g: 0.0))
    with pytest.raises(ValueError, match="objective name"):
        register_objective(ObjectiveSpec(
            name="a b", fn=lambda *a: {}, jump_embedding="table", settings=ObjectiveCfg,
            sampling=builtin._sm_sampling, target_passes=lambda o, g: 0.0))


def test_a_plugin_that_does_not_import_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('no such GPU kernel')\n")
    with pytest.raises(UserError, match=r"objective: plugins: cannot import .*RuntimeError: "
                                        r"no such GPU kernel"):
        load_recipe("quickstart", plugins=[str(broken)])
    with pytest.raises(UserError, match="file not found"):
        load_recipe("quickstart", plugins=[str(tmp_path / "missing.py")])
    with pytest.raises(UserError, match="No module named 'not_a_module_here'"):
        load_recipe("quickstart", plugins=["not_a_module_here"])


def test_sampling_protocols_of_the_shipped_objectives() -> None:
    """What each shipped objective declares is what the sampling protocol did for it."""
    ism, sm, mf = (load_recipe(r) for r in ("quickstart", "sm_quickstart", "meanflow_digits"))
    mf_intrinsic = load_recipe("meanflow_digits", ["objective.meanflow_guidance=intrinsic"])
    assert builtin.ISM.sampling(ism) == Sampling("intrinsic", "dyadic")
    assert builtin.SM.sampling(sm) == Sampling("baked", "dyadic", flow_cfg=0.5,
                                               baked="CFG at scale 1.5")
    # MeanFlow's fixed point s = omega / (1 - kappa) = 0.75 / 0.5.
    assert builtin.MEANFLOW.sampling(mf).baked.startswith("CFG at scale 1.5 ")
    assert builtin.MEANFLOW.sampling(mf_intrinsic).guidance == "intrinsic"
    assert [run_sampler(r) for r in (ism, sm, mf, mf_intrinsic)] == [
        "intrinsic", "conditional", "conditional", "intrinsic"]
    assert plan_points(sm, [1, 128], [0.0]) == [
        Point(1, 0.0, "conditional"), Point(128, 0.0, "conditional"),
        Point(128, 0.5, "flow-cfg")]
    assert [p.nfe() for p in plan_points(sm, [4, 128], [0.0])] == [4, 128, 256]
    assert Sampling("baked", "dyadic").step_error(3, 128, "sm").startswith(
        "step count 3: objective.mode 'sm' samples with jumps of 1/N")
    assert Sampling("baked", "any").step_error(3, 128) is None
    with pytest.raises(ValueError, match="Sampling.jumps"):
        Sampling("baked", "any", jumps="backwards")


def test_double_guidance_needs_a_trained_null_label() -> None:
    toy = load_recipe("quickstart", ["objective.mode=toy-flow", "ema.target_enabled=false"],
                      plugins=[TOY])
    assert run_sampler(toy) == "conditional"
    with pytest.raises(UserError, match="does not train the null label"):
        run_sampler(toy, double_guidance=True)
    assert run_sampler(load_recipe("sm_quickstart"), double_guidance=True) == "cfg"


class _ToEnd(torch.nn.Module):
    """The exact jump to the data end for data N(MU, SD^2) per dimension: the ODE's flow map
    from t to 1 is affine, x -> m(1) + sd(1) / sd(t) (x - m(t)), m(t) = t MU,
    sd(t) = sqrt((1 - t)^2 + t^2 SD^2); F = (map - x) / d with d = 1 - t. Records each d."""

    continuous_jumps = True
    MU = torch.tensor([1.5, -0.5], dtype=torch.float64).view(2, 1, 1)
    SD = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1)

    def __init__(self) -> None:
        super().__init__()
        self.jumps: list[torch.Tensor] = []

    def end(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.double().view(-1, 1, 1, 1)
        sd = torch.sqrt((1 - tb) ** 2 + tb ** 2 * self.SD ** 2)
        return self.MU + self.SD / sd * (x - tb * self.MU)

    def forward(self, x, t, d, y, w):
        self.jumps.append(d.clone())
        return (self.end(x, t) - x) / d.double().view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_to_end_jumps_move_a_share_of_the_way_to_the_predicted_end(steps: int) -> None:
    """jumps 'to_end': d_i = 1 - i/N and x <- x + (1/N) F; one step is the consistency model's
    sample, the exact end; more steps follow x_{i+1} = x_i + (end(x_i, t_i) - x_i) / (N - i)
    (numpy below), the last step landing on the end predicted from x_{N-1}."""
    net = _ToEnd()
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=gen)
    labels = torch.zeros(64, dtype=torch.long)
    x = sample(net, noise, labels, steps, jumps="to_end")
    for i, d in enumerate(net.jumps):
        torch.testing.assert_close(d, torch.full((64,), 1 - i / steps))
    mu, sd = net.MU.numpy(), net.SD.numpy()
    ref = noise.numpy().copy()
    for i in range(steps):
        t = i / steps
        s = np.sqrt((1 - t) ** 2 + t ** 2 * sd ** 2)
        end = mu + sd / s * (ref - t * mu)
        ref = ref + (end - ref) / (steps - i)
    # t and d reach the network in float32 (1/3 is not exact there): agreement to ~1e-7.
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-6)
    if steps == 1:
        np.testing.assert_allclose(x.numpy(), (net.MU + net.SD * noise).numpy(), atol=1e-10)


def test_generate_hands_the_jump_rule_to_every_batch() -> None:
    """``generate`` (what ``ismctl sample`` and the evaluator call) samples with the jump rule
    it is given: to_end jumps over batches equal ``sample``'s on the same per-sample noise."""
    from ismctl.sampling.sampler import generate, sample_noise

    x, labels = generate(_ToEnd(), 6, (2, 1, 1), 3, steps=3, guidance=0.0, mode="intrinsic",
                         seed=4, batch_size=4, device="cpu", jumps="to_end")
    noise = sample_noise(torch.arange(6), (2, 1, 1), 4)
    want = sample(_ToEnd(), noise, labels, 3, jumps="to_end")
    torch.testing.assert_close(x, want.float(), rtol=0, atol=0)
    steps = sample(_ToEnd(), noise, labels, 3)
    assert not torch.allclose(want, steps)


def test_to_end_jumps_need_a_continuous_jump_embedding() -> None:
    from ismctl.networks.model import build_model

    net = build_model("tiny/8", input_size=8, in_channels=1, num_classes=2)
    with pytest.raises(UserError, match="continuous jump sizes"):
        sample(net, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), 2,
               jumps="to_end")


def test_recipe_keys_and_show_list_a_plugin_s_settings(ismctl_main, capsys) -> None:
    assert ismctl_main("recipe", "keys", "--plugin", TOY) == 0
    out = capsys.readouterr().out
    assert "objective.mode 'toy-flow': flow matching (a test)" in out
    assert "objective.weight (float, default 1.0; objective.mode toy-flow): Factor on the " \
           "loss." in out
    # ismctl's own keys are listed as before, in the shared section of the three.
    assert "objective.meanflow_guidance (\"baked\" | \"intrinsic\", default \"baked\")" in out
    assert ismctl_main("recipe", "show", "quickstart", "--plugin", TOY, "--set",
                       "objective.mode=toy-flow", "--set", "ema.target_enabled=false") == 0
    shown = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "objective.weight" in shown and "objective.guidance_fraction" not in shown
    assert shown["objective.plugins"].split("#")[1].strip() == f"--plugin {TOY}"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


def test_an_objective_without_a_target_network_trains_without_a_target_copy(
        digits: Path, tmp_path: Path) -> None:
    """The trainer calls the plugin's loss with the recipe's settings, keeps no target EMA
    (the recipe must switch it off), logs the plugin's own loss parts, saves a run that
    reads back with the plugin's settings."""
    from ismctl.runs.checkpoint import list_checkpoints, run_recipe
    from ismctl.training.trainer import train

    recipe = load_recipe("quickstart", [
        f"data.path={digits}", f"run.root={tmp_path}", "run.name=toy", "train.steps=3",
        "run.log_every=1", "run.ckpt_every=3", "run.sample_every=1000", "run.tracker=none",
        "objective.mode=toy-flow", "objective.weight=0.5", "ema.target_enabled=false",
        "coupling.pool_size=0", "loss.name=mse"], plugins=[TOY])
    train(recipe, None, progress=False)
    run = tmp_path / "toy"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "flow" in line] == [1, 2, 3]
    assert all(line["flow"] * 0.5 == pytest.approx(line["loss"], rel=1e-6) for line in lines
               if "flow" in line)
    (step, ckpt), = list_checkpoints(run)
    assert step == 3 and not (ckpt / "target_ema.safetensors").exists()
    stored = yaml.safe_load((run / "recipe.yaml").read_text())["objective"]
    assert stored["mode"] == "toy-flow" and stored["weight"] == 0.5
    assert run_recipe(run).objective.weight == 0.5
    calls = sys.modules["ismctl_plugin_toy_flow"].CALLS
    assert calls and all(c["target_is_model"] for c in calls)



def test_the_python_api_samples_the_step_counts_the_network_takes(tmp_path: Path) -> None:
    """A network with continuous jumps takes any N through ismctl.load_model as on the command
    line; a table network only the powers of two it was trained on."""
    from test_api import make_run

    from ismctl import load_model
    from ismctl.config.recipe import save_recipe
    from ismctl.data.manifest import read_manifest
    from ismctl.runs.checkpoint import WEIGHT_FILES, model_from_recipe, save_checkpoint

    ism = make_run(tmp_path, "ism")
    with pytest.raises(UserError, match="power of two"):
        load_model(ism, device="cpu").sample(num=2, steps=3)
    meanflow = tmp_path / "meanflow"
    meanflow.mkdir()
    recipe = load_recipe(ism / "recipe.yaml", ["objective.mode=meanflow"])
    save_recipe(recipe, meanflow / "recipe.yaml")
    (meanflow / "manifest.json").write_bytes((ism / "manifest.json").read_bytes())
    net = model_from_recipe(recipe, read_manifest(meanflow / "manifest.json"))
    save_checkpoint(meanflow, 4, dict.fromkeys(WEIGHT_FILES, net),
                    {"step": 4, "recipe": recipe.model_dump(mode="json")})
    images = load_model(meanflow, device="cpu").sample(num=2, steps=3)
    assert images.shape == (2, 8, 8, 1)
