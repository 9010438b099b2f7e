"""The few-step study takes any recipe and knob grid (``--method NAME:RECIPE:KEY=V1,...``): here
the consistency-training example beside sm, run end to end on a stand-in ``ismctl`` (no
training), its knob tuned by the study's protocol and its results kept under its own name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ismctl.studies import few_step as fs
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "consistency"
CT = f"ct:{EXAMPLE / 'ismctl_ct' / 'ct_digits.yaml'}:objective.scales=4,8,16"

# `train` writes the checkpoints and a metrics log (2 it/s); `eval` scores every requested point,
# selection samples (sampling seed 1) by how far the knob value is from $FAKE_CENTER[method]
# (sm adds its flow-CFG entry at 128 steps), reported ones by a fixed number; `sample` writes a
# 1x1 PNG. Every call goes to $FAKE_LOG.
FAKE = r'''
import json, os, struct, sys, zlib
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
if args[0] == "train":
    sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
    run = Path(sets["run.root"]) / sets["run.name"]
    steps, every = int(sets["train.steps"]), int(sets.get("run.ckpt_every", sets["train.steps"]))
    for step in range(every, steps + 1, every):
        ckpt = run / "checkpoints" / f"step-{step:07d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        for name in ("inference_ema", "online", "target_ema"):
            (ckpt / f"{name}.safetensors").write_bytes(b"w")
    log = int(sets.get("run.log_every", 50))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "it_s": 2.0}) + "\n" for s in range(log, steps + 1, log)))
elif args[0] == "eval":
    ckpt = Path(args[1])
    method, tag = ckpt.parent.parent.name.split("_", 1)
    knob = tag.rsplit("-seed", 1)[0]
    value = float(knob.lstrip("abcdefghijklmnopqrstuvwxyz"))
    n, sseed = int(opt["--steps"]), int(opt["--seed"])
    requested = [(float(w), "conditional") for w in opt["--guidance"].split(",")]
    if method == "sm" and n == 128:
        requested.append((value - 1, "flow-cfg"))
    center = json.loads(os.environ["FAKE_CENTER"])[method]
    points = [{"steps": n, "guidance": w, "sampler": s, "num_samples": 1000,
               "metrics": {"acc": 0.9, "fd-digits": 1.0, "spread-digits": 0.8,
                           "cfd-digits": 10 + abs(value - center) if sseed == 1 else 20.0}}
              for w, s in requested]
    Path(opt["--out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(opt["--out"]).write_text(json.dumps({
        "checkpoint": {"sha256": "f" * 64}, "ismctl_version": "fake", "torch": "fake",
        "created": "2026-01-01T00:00:00+00:00", "points": points}))
elif args[0] == "sample":
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    Path(opt["--out"]).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))
'''
# Objectives registered here do not outlive the test (the registry is per process).
pytestmark = pytest.mark.usefixtures("plugin_registry")


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example importable (its recipe names the module), and the study's method table as it
    was afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(fs, "METHODS", dict(fs.METHODS))


def test_a_method_from_the_command_line(example: None) -> None:
    ct = fs.method_from_spec(CT)
    assert (ct.name, ct.knob, ct.short, ct.values) == ("ct", "objective.scales", "scales",
                                                       (4.0, 8.0, 16.0))
    # A baked knob grows by its grid's last step above and its first step below.
    assert (ct.widen, ct.widen_down, ct.intrinsic) == (8.0, 4.0, False)
    assert ct.run_name(8, 1) == "ct_scales8-seed1"
    assert ct.train_overrides(8, 1) == ["objective.scales=8", "train.seed=1"]
    # Where the recipe refuses a value (scales is an integer >= 1), the grid does not grow.
    assert ct.accepts(24) and not ct.accepts(0) and not ct.accepts(1.5)
    ism = fs.method_from_spec("ism2:quickstart:guidance.w_max=1.5")
    assert ism.intrinsic and ism.widen_down == 0.0
    with pytest.raises(UserError, match="its knob is the w_max"):
        fs.method_from_spec("ism3:quickstart:guidance.w_step=0.25,0.5")
    with pytest.raises(UserError, match="already has a method of that name"):
        fs.method_from_spec("sm:sm_quickstart:guidance.cfg_scale=1,2")
    for bad in ("ct", "ct:quickstart", "ct:quickstart:objective.scales=a,b", "a b:quickstart:x=1"):
        with pytest.raises(UserError, match="expected NAME:RECIPE:KEY=V1,V2"):
            fs.method_from_spec(bad)
    with pytest.raises(UserError, match="objective.scales"):
        fs.method_from_spec(f"ct:{EXAMPLE / 'ismctl_ct' / 'ct_digits.yaml'}:objective.scales=0,4")


def test_the_example_enters_the_study_beside_sm(example: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Tuned like sm: its chosen value sits inside its grid after widening (the best value, 2,
    is below the first grid: 4 -> 0 is refused, half-way to 0 is 2, then 1 is accepted and 2 is
    interior), reported on every seed, its results under its own name with the study's keys."""
    (tmp_path / "fake.py").write_text(FAKE)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_CENTER", json.dumps({"sm": 1.5, "ct": 2}))
    ct = fs.method_from_spec(CT)
    fs.add_method(ct)
    study = fs.Study(tmp_path / "runs", train_steps=300, seeds=[0, 1], jobs=2,
                     ismctl=[sys.executable, str(tmp_path / "fake.py")],
                     results=tmp_path / "results", methods=["sm", "ct"])
    fs.run_study(study)
    assert study.grids.values["ct"] == [1.0, 2.0, 4.0, 8.0, 16.0]
    chosen = fs.choose(study)
    assert {n: c["value"] for n, c in chosen["ct"].items()} == dict.fromkeys(fs.STEPS, 2.0)
    assert {n: c["value"] for n, c in chosen["sm"].items()} == dict.fromkeys(fs.STEPS, 1.5)
    kept = study.results.root / "ct" / "scales2-seed1" / "step300-4steps-sseed0-conditional-w0.json"
    record = json.loads(kept.read_text())
    assert (record["method"], record["knob"], record["value"], record["train_seed"]) == (
        "ct", "objective.scales", 2.0, 1)
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert {c[0] for c in calls} == {"train", "eval", "sample"}
    ct_runs = {a.split("=", 1)[1] for c in calls if c[0] == "train" for a in c
               if a.startswith("run.name=ct_")}
    assert ct_runs == {"ct_scales1-seed0", "ct_scales2-seed0", "ct_scales4-seed0",
                       "ct_scales8-seed0", "ct_scales16-seed0", "ct_scales2-seed1"}
    summary = fs.summarise(study)
    assert summary["methods"]["ct"]["knob"] == "objective.scales"
    assert set(summary["equal_steps"]["ct"]) == {str(n) for n in fs.STEPS}
    assert "| ct | objective.scales = 2 |" in fs.markdown(summary)
