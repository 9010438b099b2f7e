from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ismctl.sampling.sampler import (
    balanced_labels,
    check_steps,
    generate,
    sample,
    sample_noise,
)
from ismctl.utils.errors import UserError

NUM_CLASSES = 3
NULL = NUM_CLASSES
MU = torch.tensor([1.5, -0.5, 0.3, 2.0], dtype=torch.float64).view(4, 1, 1)
SD = torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64).view(4, 1, 1)


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _mean_sd(t: Tensor) -> tuple[Tensor, Tensor]:
    # x_t = (1 - t) x0 + t x1, x0 ~ N(0, 1), x1 ~ N(MU, SD^2): Gaussian per dimension.
    t = _col(t)
    return t * MU, torch.sqrt((1 - t) ** 2 + t**2 * SD**2)


def exact_velocity(x: Tensor, t: Tensor) -> Tensor:
    """E[x1 - x0 | x_t] in closed form (affine in x_t)."""
    a, b = _col(1 - t), _col(t)
    var = a**2 + b**2 * SD**2
    centred = x - b * MU
    return (MU + b * SD**2 * centred / var) - a * centred / var


def exact_average_velocity(x: Tensor, t: Tensor, d: Tensor) -> Tensor:
    """(flow(x, t -> t + d) - x) / d: the Gaussian ODE flow map is affine per dimension."""
    m, sd = _mean_sd(t)
    m2, sd2 = _mean_sd(t + d)
    return (m2 + sd2 / sd * (x - m) - x) / _col(d)


class FieldNet(nn.Module):
    """A network-shaped wrapper that records every call (rows, inputs, train/eval mode)."""

    def __init__(self, field, num_classes: int | None = NUM_CLASSES) -> None:
        super().__init__()
        self.field = field
        if num_classes is not None:
            self.num_classes = num_classes
        self.calls: list[dict] = []

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        self.calls.append({"rows": x.shape[0], "t": t.clone(), "d": d.clone(), "y": y.clone(),
                           "w": w.clone(), "training": self.training})
        return self.field(x, t, d, y, w)


def _shortcut_field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    return exact_average_velocity(x, t.double(), d.double())


def _instantaneous_field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    return exact_velocity(x, t.double())


def _constant_field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    base = torch.where(y == NULL, 1.0, 3.0).to(x.dtype) + 10.0 * w.to(x.dtype)
    return _col(base).expand_as(x).clone()


@pytest.mark.parametrize("steps", [1, 2, 4, 128])
def test_exact_shortcut_field_lands_on_the_data_distribution(steps: int) -> None:
    n = 8_000
    noise = torch.randn(n, 4, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(n, dtype=torch.long)
    x = sample(FieldNet(_shortcut_field), noise, labels, steps)
    # The exact jumps compose to the exact flow map x0 -> MU + SD x0.
    torch.testing.assert_close(x, MU + SD * noise, rtol=1e-8, atol=1e-8)
    # And the sample statistics match the data: mean within 5 standard errors, sd within 5%.
    mean, sd = x.mean(0).flatten(), x.std(0).flatten()
    assert torch.all((mean - MU.flatten()).abs() < 5 * SD.flatten() / np.sqrt(n))
    assert torch.all((sd / SD.flatten() - 1).abs() < 0.05)


def test_euler_on_instantaneous_field_gets_close_at_128_steps() -> None:
    n = 8_000
    noise = torch.randn(n, 4, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(n, dtype=torch.long)
    x = sample(FieldNet(_instantaneous_field), noise, labels, 128)
    exact = MU + SD * noise
    # First-order Euler error at d = 1/128 (measured worst case ~0.1 on the sd = 2 dimension,
    # ~0.016 on the sd = 0.1 one): a few percent of max(sd, 1) over 8k samples.
    assert ((x - exact).abs().max(0).values.flatten() < 0.06 * SD.flatten().clamp(min=1)).all()
    mean, sd = x.mean(0).flatten(), x.std(0).flatten()
    assert torch.all((mean - MU.flatten()).abs() < 0.05)
    assert torch.all((sd / SD.flatten() - 1).abs() < 0.1)
    one_step = sample(FieldNet(_instantaneous_field), noise, labels, 1)
    assert (one_step - exact).abs().mean() > 10 * (x - exact).abs().mean()


def test_intrinsic_one_pass_per_step_with_w_input() -> None:
    net = FieldNet(_constant_field)
    noise = torch.zeros(5, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, NULL])
    x = sample(net, noise, labels, 4, guidance=0.5)
    assert [c["rows"] for c in net.calls] == [5] * 4
    for i, call in enumerate(net.calls):
        torch.testing.assert_close(call["t"], torch.full((5,), i / 4))
        torch.testing.assert_close(call["d"], torch.full((5,), 0.25))
        torch.testing.assert_close(call["w"], torch.full((5,), 0.5))
    want = torch.tensor([8.0, 8.0, 8.0, 8.0, 6.0])
    torch.testing.assert_close(x[:, 0, 0, 0], want)


def test_cfg_two_passes_per_step() -> None:
    net = FieldNet(_constant_field)
    noise = torch.zeros(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 1])
    x = sample(net, noise, labels, 2, guidance=0.5, mode="cfg")
    assert [c["rows"] for c in net.calls] == [8, 8]
    for call in net.calls:
        torch.testing.assert_close(call["y"], torch.cat([labels, torch.full((4,), NULL)]))
        torch.testing.assert_close(call["w"], torch.zeros(8))
    # v = v_c + w (v_c - v_null) = 3 + 0.5 (3 - 1) = 4 per unit time.
    torch.testing.assert_close(x, torch.full_like(x, 4.0))
    # Both halves of every call ask for the step's jump, d = 1/N.
    for call in net.calls:
        torch.testing.assert_close(call["d"], torch.full((8,), 0.5))


def test_cfg_needs_the_null_label() -> None:
    net = FieldNet(_constant_field, num_classes=None)
    noise, labels = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(UserError):
        sample(net, noise, labels, 1, 1.0, mode="cfg")
    x = sample(net, noise, labels, 1, 1.0, mode="cfg", num_classes=NUM_CLASSES)
    torch.testing.assert_close(x, torch.full_like(x, 5.0))


@pytest.mark.parametrize("steps", [0, 3, 6, 256])
def test_rejects_bad_step_counts(steps: int) -> None:
    net = FieldNet(_constant_field)
    with pytest.raises(UserError):
        sample(net, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), steps)
    with pytest.raises(UserError):
        generate(net, 2, (1, 2, 2), NUM_CLASSES, steps, 0.0, "intrinsic", 0, 2, "cpu")
    if steps:  # the dyadic rule is the default: only continuous jump sizes lift it
        with pytest.raises(UserError, match="power of two"):
            check_steps(steps, 128)
        check_steps(steps, 256, continuous=True)



@pytest.mark.parametrize("steps", [3, 6, 256])
def test_continuous_jump_networks_take_any_step_count(steps: int) -> None:
    """A network trained on continuous jump sizes (MeanFlow) samples any N >= 1, N passes."""
    net = FieldNet(_constant_field)
    net.continuous_jumps = True
    x = sample(net, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), steps)
    torch.testing.assert_close(x, torch.full_like(x, 3.0))
    images, _ = generate(net, 2, (1, 2, 2), NUM_CLASSES, steps, 0.0, "intrinsic", 0, 2, "cpu")
    assert images.shape == (2, 1, 2, 2)
    with pytest.raises(UserError, match="positive integer"):
        sample(net, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), 0)

def test_sample_runs_in_eval_and_restores_mode() -> None:
    net = FieldNet(_constant_field)
    net.train()
    sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 2)
    assert not any(c["training"] for c in net.calls) and net.training


def _noisy_field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    return -x * _col(1 + t) + _col(y.to(x.dtype) + w)


def test_generate_is_deterministic_and_independent_of_batch_size() -> None:
    net = FieldNet(_noisy_field)
    args = dict(num=11, shape=(2, 3, 3), num_classes=NUM_CLASSES, steps=4, guidance=1.0,
                mode="intrinsic", device="cpu")
    x_a, y_a = generate(net, seed=7, batch_size=11, **args)
    x_b, y_b = generate(net, seed=7, batch_size=3, **args)
    x_c, y_c = generate(net, seed=7, batch_size=4, progress=True, **args)
    assert x_a.shape == (11, 2, 3, 3) and x_a.dtype == torch.float32
    assert y_a.dtype == torch.long
    torch.testing.assert_close(x_a, x_b, rtol=0, atol=0)
    torch.testing.assert_close(x_a, x_c, rtol=0, atol=0)
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=0)
    x_d, _ = generate(net, seed=8, batch_size=11, **args)
    assert not torch.equal(x_a, x_d)


def test_noise_depends_only_on_seed_and_index() -> None:
    a = sample_noise(torch.arange(6), (2, 2), seed=3)
    b = sample_noise(torch.tensor([4, 1]), (2, 2), seed=3)
    torch.testing.assert_close(b, a[[4, 1]], rtol=0, atol=0)
    c = sample_noise(torch.arange(6), (2, 2), seed=4)
    assert not torch.equal(a, c)
    big = sample_noise(torch.arange(2000), (4,), seed=0)
    assert abs(float(big.mean())) < 0.05 and abs(float(big.std()) - 1) < 0.05
    # The entries of a sample are independent draws, not one number repeated.
    assert abs(float(torch.corrcoef(big.T)[0, 1])) < 0.1
    # Sample i is the float32 stream of PCG64 seeded by SeedSequence([seed, i]), as documented:
    # the evaluation noise stays fixed across releases.
    stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 4])))
    np.testing.assert_array_equal(a[4].numpy(), stream.standard_normal((2, 2), dtype=np.float32))


def test_labels_are_class_balanced_and_checked() -> None:
    labels = balanced_labels(30, NUM_CLASSES, seed=0)
    np.testing.assert_array_equal(np.bincount(labels.numpy()), [10, 10, 10])
    assert not torch.equal(labels, balanced_labels(30, NUM_CLASSES, seed=1))
    net = FieldNet(_constant_field)
    given = torch.tensor([2, 2, NULL])
    _, y = generate(net, 3, (1, 2, 2), NUM_CLASSES, 1, 0.0, "intrinsic", 0, 2, "cpu",
                    labels=given)
    torch.testing.assert_close(y, given)
    with pytest.raises(UserError):
        generate(net, 3, (1, 2, 2), NUM_CLASSES, 1, 0.0, "intrinsic", 0, 2, "cpu",
                 labels=torch.tensor([0, 1, 7]))


def test_conditional_sampler_is_one_unguided_pass_with_the_label() -> None:
    net = FieldNet(_constant_field)
    noise = torch.zeros(3, 1, 2, 2)
    labels = torch.tensor([0, 1, 2])
    x = sample(net, noise, labels, 2, guidance=0.0, mode="conditional")
    assert [c["rows"] for c in net.calls] == [3, 3]
    for call in net.calls:
        torch.testing.assert_close(call["y"], labels)
        torch.testing.assert_close(call["w"], torch.zeros(3))
        torch.testing.assert_close(call["d"], torch.full((3,), 0.5))
    torch.testing.assert_close(x, torch.full_like(x, 3.0))
    with pytest.raises(UserError, match="w = 0"):
        sample(net, noise, labels, 2, guidance=1.0, mode="conditional")


def test_flow_cfg_integrates_the_instantaneous_velocity_with_cfg() -> None:
    """flow-cfg asks for the network's flow jump at every step, d = 0 for an ism network (the
    d > 0 rows of this field are wrong on purpose), combines label and null rows, and at 128
    steps lands on the exact flow."""

    def field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        exact = exact_velocity(x, t.double())
        return torch.where(_col(d) == 0, exact, exact + 100.0)

    n = 4_000
    noise = torch.randn(n, 4, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(n, dtype=torch.long)
    net = FieldNet(field)
    x = sample(net, noise, labels, 128, guidance=0.5, mode="flow-cfg")
    assert [c["rows"] for c in net.calls] == [2 * n] * 128
    assert all(bool((c["d"] == 0).all()) for c in net.calls)
    torch.testing.assert_close(net.calls[0]["y"], torch.cat([labels, torch.full((n,), NULL)]))
    # Label and null rows agree in this field, so CFG changes nothing: the exact flow map.
    assert ((x - (MU + SD * noise)).abs().max(0).values.flatten()
            < 0.06 * SD.flatten().clamp(min=1)).all()
    constant = FieldNet(_constant_field)
    y = sample(constant, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 4, 0.5, mode="flow-cfg")
    torch.testing.assert_close(y, torch.full_like(y, 4.0))


def test_flow_cfg_of_an_sm_network_asks_for_the_finest_jump() -> None:
    """An sm network trains its flow at the finest jump's embedding, d = 1/M (method §2): its
    flow-CFG entry asks for that d, not d = 0, whatever the number of steps; the recipe's
    network carries that jump."""
    from ismctl.config.recipe import Recipe
    from ismctl.objectives import flow_jump
    from ismctl.runs.checkpoint import model_from_recipe

    def field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        base = torch.where(_col(d) == 1 / 8, 3.0, -50.0).to(x.dtype)
        return (base + torch.where(_col(y) == NULL, -1.0, 0.0)).expand_as(x).clone()

    net = FieldNet(field)
    net.flow_jump = 1 / 8
    x = sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 4, 0.5, mode="flow-cfg",
               base_steps=8)
    assert all(bool((c["d"] == 1 / 8).all()) for c in net.calls) and len(net.calls) == 4
    # v_c + 0.5 (v_c - v_null) = 3 + 0.5 per unit time.
    torch.testing.assert_close(x, torch.full_like(x, 3.5))
    recipe = Recipe.model_validate({"objective": {"mode": "sm", "base_steps": 8},
                                    "eval": {"steps": [1]}, "model": {"preset": "tiny/2"}})
    assert flow_jump(recipe) == 1 / 8
    manifest = SimpleNamespace(num_classes=NUM_CLASSES, channels=1, latent_size=8)
    assert model_from_recipe(recipe, manifest).flow_jump == 1 / 8


@pytest.mark.parametrize(("mode", "guidance"), [("intrinsic", 1.0), ("conditional", 0.0),
                                                ("cfg", 1.0), ("flow-cfg", 1.0)])
def test_sampling_loop_reads_nothing_back_from_the_device(mode: str, guidance: float,
                                                          host_reads) -> None:
    """The step count is checked once up front; the steps themselves only queue work, with a
    real network too (its jump-size look-up has no host read)."""
    from ismctl.networks.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny/2", 8, 1, NUM_CLASSES)
    noise = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, NULL])
    with host_reads() as reads:
        x = sample(model, noise, labels, 8, guidance=guidance, mode=mode)
    assert reads.ops == []
    assert x.shape == noise.shape and not x.requires_grad and torch.is_inference(x)


class _MatmulField(nn.Module):
    """A constant velocity of 1e-3 computed by a matrix product, so that autocast runs it in
    bf16, while the state it is added to stays near 1."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, 1), 1e-3))
        self.input_dtypes: list[torch.dtype] = []

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        self.input_dtypes.append(x.dtype)
        v = torch.ones(x.numel(), 1, device=x.device) @ self.weight
        assert v.dtype == torch.bfloat16  # autocast is on around the network
        return v.reshape(x.shape)


def test_bf16_autocast_integrates_the_state_in_float32() -> None:
    """128 steps of 1e-3 / 128 on a state of 1: float32 keeps every increment (1.001), a bf16
    state (8-bit mantissa, spacing 2^-7 near 1) would lose them all and stay at 1."""
    net = _MatmulField()
    noise = torch.ones(2, 1, 2, 2)
    x = sample(net, noise, torch.zeros(2, dtype=torch.long), 128,
               autocast_dtype=torch.bfloat16)
    assert x.dtype == torch.float32
    assert set(net.input_dtypes) == {torch.float32}
    bf16_weight = net.weight.detach().bfloat16().float().item()
    # float32 rounding of 128 additions stays below 128 x 6e-8; a bf16 state is 1e-3 off.
    torch.testing.assert_close(x, torch.full_like(noise, 1 + bf16_weight), rtol=0, atol=1e-5)


def test_generate_hands_every_setting_to_the_sampler(capsys: pytest.CaptureFixture[str]) -> None:
    """generate() is sample() in batches: the same guidance, sampler, step range, autocast
    precision and null label as one sample() call, a batch of one and a single sample allowed,
    labels returned as int64 whatever they came as; its bar shows only when asked."""
    dtypes: list[torch.dtype] = []

    def field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        dtypes.append((x @ torch.ones(x.shape[-1], x.shape[-1], dtype=x.dtype)).dtype)
        return _constant_field(x, t, d, y, w)

    net = FieldNet(field, num_classes=None)
    labels = np.array([0, NULL, 1], dtype=np.int32)
    x, y = generate(net, 3, (1, 2, 2), NUM_CLASSES, 256, 0.5, "cfg", 0, 1, "cpu",
                    labels=labels, base_steps=256, autocast_dtype=torch.bfloat16)
    assert y.dtype == torch.long and y.tolist() == [0, NULL, 1]
    noise = sample_noise(torch.arange(3), (1, 2, 2), 0)
    want = sample(FieldNet(_constant_field), noise, y, 256, 0.5, mode="cfg", base_steps=256,
                  num_classes=NUM_CLASSES)
    torch.testing.assert_close(x, want)
    assert len(net.calls) == 3 * 256 and set(dtypes) == {torch.bfloat16}
    # w = 0.5 on the label rows: 3 + 0.5 (3 - 1) = 4 per unit time; null rows stay at 1.
    torch.testing.assert_close(x[0], noise[0] + 4.0)
    one, _ = generate(FieldNet(_constant_field), 1, (1, 2, 2), NUM_CLASSES, 1, 1.0,
                      "intrinsic", 0, 1, "cpu")
    assert one.shape == (1, 1, 2, 2)
    capsys.readouterr()
    generate(FieldNet(_constant_field), 2, (1, 2, 2), NUM_CLASSES, 1, 0.0, "intrinsic", 0, 2,
             "cpu")
    assert capsys.readouterr().out == ""
    generate(FieldNet(_constant_field), 2, (1, 2, 2), NUM_CLASSES, 1, 0.0, "intrinsic", 0, 2,
             "cpu", progress=True)
    assert "sampling 1 step(s), w=0" in capsys.readouterr().out
    for num, batch in ((0, 1), (1, 0)):
        with pytest.raises(UserError, match="num and batch_size"):
            generate(FieldNet(_constant_field), num, (1, 2, 2), NUM_CLASSES, 1, 0.0,
                     "intrinsic", 0, batch, "cpu")


def test_without_autocast_dtype_the_network_runs_outside_autocast() -> None:
    """autocast_dtype None (fp32 sampling): no autocast around the network; bf16 puts it
    there."""
    for dtype, want in ((None, [False, False]), (torch.bfloat16, [True, True])):
        net, seen = FieldNet(_constant_field), []
        net.register_forward_pre_hook(
            lambda *_, seen=seen: seen.append(torch.is_autocast_enabled("cpu")))
        sample(net, torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 2,
               autocast_dtype=dtype)
        assert seen == want, dtype


def test_flow_cfg_takes_the_flow_jump_whatever_the_jump_rule() -> None:
    """flow-cfg integrates the instantaneous (flow) velocity: jumps 'to_end' does not apply to
    it, and it asks for the flow jump at every step as with the default rule."""
    calls = {}
    for jumps in ("step", "to_end"):
        net = FieldNet(_constant_field)
        net.continuous_jumps = True
        sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 4, 0.5, mode="flow-cfg",
               jumps=jumps)
        calls[jumps] = [c["d"] for c in net.calls]
    assert len(calls["to_end"]) == 4
    for a, b in zip(calls["step"], calls["to_end"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a == 0).all()


def test_two_pass_to_end_jumps_ask_both_halves_for_the_rest_of_the_way() -> None:
    """cfg under the to_end rule: the label and null rows of step i both jump d = 1 - i/N."""
    net = FieldNet(_constant_field)
    net.continuous_jumps = True
    sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 4, 0.5, mode="cfg", jumps="to_end")
    for i, call in enumerate(net.calls):
        torch.testing.assert_close(call["d"], torch.full((4,), 1 - i / 4))
