"""profile(): measures without touching the user's model; Profiles are JSON data that match graphs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import BY_NAME

import tspipe_fx
from tspipe_fx import CaptureError, Profile, ProfileError, capture, profile
from tspipe_fx.report.profile import render_profile


@pytest.fixture(scope="module")
def resnet_profile() -> Profile:
    case = BY_NAME["timm_resnet18"]
    return profile(case.build(), case.inputs(2), repeats=2)


def test_profiling_changes_nothing_in_the_users_model() -> None:
    case = BY_NAME["timm_resnet18"]
    model = case.build()
    model.layer2.eval()  # a mixed train/eval state must survive too
    for p in list(model.parameters())[:3]:
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    inputs = case.inputs(2)
    rng = torch.get_rng_state()

    profile(model, inputs, repeats=1)

    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
    assert torch.equal(torch.get_rng_state(), rng)


def test_profile_records_every_node_and_fidelity(resnet_profile: Profile) -> None:
    p = resnet_profile
    assert p.model_name == "ResNet" and p.repeats == 2
    assert len(p.nodes) == 87 and p.nodes[0].op == "placeholder" and p.nodes[-1].op == "output"
    assert p.model_fwd_ms > 0 and p.model_fwd_bwd_ms > p.model_fwd_ms
    assert p.sum_fwd_ms == pytest.approx(sum(n.info.fwd_ms or 0 for n in p.nodes))
    assert p.fidelity_fwd == pytest.approx(p.sum_fwd_ms / p.model_fwd_ms)
    assert p.sizes == {"B": 2}
    assert p.torch_version == torch.__version__
    assert p.inputs[0].shape == (2, 3, 32, 32) and p.inputs[0].dtype == "float32"


def test_profile_counts_operations_and_the_launch_cost(resnet_profile: Profile) -> None:
    """Issue 15.6: each node's ATen operations (a GPU's kernel launches) forward and backward, and
    the device's host cost per operation, measured once."""
    by_name = {n.name: n.info for n in resnet_profile.nodes}
    assert by_name["conv1"].fwd_ops == 1 and by_name["conv1"].bwd_ops >= 1  # convolution(_backward)
    assert by_name["act1"].fwd_ops == 1
    assert by_name["x"].fwd_ops == by_name["x"].bwd_ops == 0  # the input launches nothing
    assert 0 < resnet_profile.launch_us < 1e4
    from tspipe_fx.passes.measure import OpCount

    with OpCount() as count:  # views are metadata: no kernel
        torch.randn(4, 4).view(16).unsqueeze(0).add(1)
    assert count.count == 2  # randn and add


def test_a_steps_host_time_is_divided_by_the_operations_it_dispatches() -> None:
    """On a GPU, ``profile`` prices an operation at what the model's own step costs its host
    (step_host_us): a step of 4 operations whose host spends 20 ms reads 5 ms an operation."""
    import time

    from tspipe_fx.cost.launch import step_host_us

    x = torch.ones(4)

    def step() -> None:
        time.sleep(0.02)  # the host's share: Python, dispatch, autograd recording
        (x + 1).mul_(2).sub_(1).neg()

    step()
    (per_op,) = step_host_us(step, "cpu", repeats=3)
    assert 5_000 <= per_op < 25_000  # microseconds; the sleep may overshoot on a loaded machine


def fake_cuda(monkeypatch: pytest.MonkeyPatch, spin_over: Callable[[], bool]) -> list[int]:
    """CUDA's synchronize, spin and events faked for step_host_us on a CPU: ``spin_over()`` is
    what an event's query says (was the spin ahead of the part over?). Returns the list that
    collects the spins' cycles. The calibration reads 10 ms for its 10M cycles."""
    sleeps: list[int] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self) -> None:
            pass

        def query(self) -> bool:
            return spin_over()

        def elapsed_time(self, other: object) -> float:
            return 10.0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return sleeps


@pytest.mark.parametrize("spin_over", [False, True])
def test_a_gpu_steps_host_time_counts_only_where_the_host_never_waited(
    monkeypatch: pytest.MonkeyPatch, spin_over: bool
) -> None:
    """On a GPU each timed step queues behind a spin kernel; if the spin was over when the host
    returned, the host may have waited for the device (a full launch queue), and the figure
    would be the device's: None. (CUDA faked: what is pinned is the rule, not the clock.)"""
    import time

    from tspipe_fx.cost.launch import step_host_us

    fake_cuda(monkeypatch, lambda: spin_over)
    x = torch.ones(4)

    def step() -> None:
        time.sleep(0.01)
        (x + 1).mul_(2)

    got = step_host_us(step, "cuda:0", repeats=2)
    assert got is None if spin_over else 5_000 <= got[0] < 25_000  # 10 ms over 2 operations


@pytest.mark.parametrize("over_in", [None, "forward", "backward"])
def test_a_step_in_parts_is_timed_part_by_part_each_behind_its_spin(
    monkeypatch: pytest.MonkeyPatch, over_in: str | None
) -> None:
    """A step of more kernels than the launch queue holds is timed as its forward and its
    backward, each behind its own spin: the figure is their host times over all their
    operations, and None if either part's spin was over. (CUDA faked.)"""
    import time

    from tspipe_fx.cost.launch import step_host_us

    running: list[str] = []
    sleeps = fake_cuda(monkeypatch, lambda: running[-1] == over_in)  # the spin ahead of this part
    x = torch.ones(4)

    def forward() -> None:
        running.append("forward")
        time.sleep(0.01)
        (x + 1).mul_(2)

    def backward() -> None:
        running.append("backward")
        time.sleep(0.02)
        (x - 1).neg()

    got = step_host_us((forward, backward), "cuda:0", repeats=3)
    if over_in is None:  # 10 ms over the forward's 2 operations, 20 ms over the backward's 2
        assert 5_000 <= got[0] < 15_000 and 10_000 <= got[1] < 25_000
    else:
        assert got is None
    assert len(sleeps) == 1 + 2 * 3  # the calibration, then one spin per part and repeat


def test_a_node_costs_at_least_its_launches(resnet_profile: Profile) -> None:
    from tspipe_fx.cost.builtin import MeasuredCost

    gm = capture(BY_NAME["timm_resnet18"].build(), BY_NAME["timm_resnet18"].inputs(2)).graph_module
    device_only = MeasuredCost(
        dataclasses.replace(resnet_profile, launch_us=0.0, launch_bwd_us=0.0)
    ).graph_costs(gm)
    # 10 ms a forward operation, 20 ms a backward one
    host_bound = MeasuredCost(
        dataclasses.replace(resnet_profile, launch_us=1e4, launch_bwd_us=2e4)
    ).graph_costs(gm)
    old_profile = MeasuredCost(
        dataclasses.replace(resnet_profile, launch_us=1e4, launch_bwd_us=0.0)
    ).graph_costs(gm)
    for node, a, b, c, rec in zip(
        gm.graph.nodes, device_only, host_bound, old_profile, resnet_profile.nodes, strict=True
    ):
        assert b.fwd_ms == pytest.approx(max(a.fwd_ms, rec.info.fwd_ops * 10.0)), node.name
        assert b.bwd_ms == pytest.approx(max(a.bwd_ms, rec.info.bwd_ops * 20.0)), node.name
        # a profile of one figure (saved before backward's own) prices both with it
        assert c.bwd_ms == pytest.approx(max(a.bwd_ms, rec.info.bwd_ops * 10.0)), node.name


def test_profile_round_trips_through_json(resnet_profile: Profile, tmp_path: Path) -> None:
    assert Profile.from_json(resnet_profile.to_json()) == resnet_profile
    path = tmp_path / "sub" / "resnet.json"
    resnet_profile.save(path)
    assert Profile.load(path) == resnet_profile
    assert [f.name for f in path.parent.iterdir()] == ["resnet.json"]  # no temp file left behind
    assert path.stat().st_mode & 0o044 == 0o044  # readable like any file the user writes


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda t: t[: len(t) // 2], "not a tspipe_fx profile"),
        (lambda t: json.dumps({**json.loads(t), "format_version": 99}), "format_version is not 1"),
        (lambda t: t.replace('"fwd_ms"', '"fwd_sec"', 1), "unknown node fields"),
        (
            lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "graph_hash"}),
            "not a tspipe_fx",
        ),
    ],
)
def test_corrupted_profiles_are_clear_errors(resnet_profile: Profile, tmp_path: Path, mangle, match) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.json"
    path.write_text(mangle(resnet_profile.to_json()))
    with pytest.raises(ProfileError, match=match):
        Profile.load(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        Profile.load(tmp_path / "nope.json")


def test_a_profile_matches_only_its_graph_and_inputs(resnet_profile: Profile) -> None:
    case = BY_NAME["timm_resnet18"]
    same = capture(case.build(), case.inputs(2))
    resnet_profile.check(same, same.flatten_inputs(case.inputs(2), {}))
    gm = resnet_profile.attach(same)
    assert gm.graph is same.graph_module.graph
    assert next(iter(gm.graph.nodes)).meta["tspipe"] == resnet_profile.nodes[0].info

    other = capture(BY_NAME["torchvision_resnet18"].build(), case.inputs(2))
    with pytest.raises(ProfileError, match=r"does not match this graph .* 71 nodes vs 87 profiled"):
        resnet_profile.check(other)
    with pytest.raises(ProfileError, match=r"made for inputs x\[2x3x32x32\]:float32, got x\[4x3x32x32\]"):
        resnet_profile.check(same, [torch.randn(4, 3, 32, 32)])


def test_reports_are_tables(resnet_profile: Profile) -> None:
    by_module = render_profile(resnet_profile)
    lines = by_module.splitlines()
    assert lines[0].split()[:3] == ["module", "type", "nodes"]
    assert any(line.startswith("layer3.1 ") and "BasicBlock" in line for line in lines)
    assert "fidelity" in lines[-1]
    top = render_profile(resnet_profile, by="node", top=3).splitlines()
    assert top[0].split()[:3] == ["node", "op", "module"]
    assert len(top) == 2 + 3 + 3  # header, rule, 3 rows, 3 summary lines
    shallow = render_profile(resnet_profile, depth=1)
    assert any(line.startswith("layer3 ") for line in shallow.splitlines())
    with pytest.raises(ProfileError, match="must be 'module' or 'node'"):
        render_profile(resnet_profile, by="layer")  # type: ignore[arg-type]


def test_profile_accepts_a_captured_model_and_hf_kwargs() -> None:
    case = BY_NAME["hf_distilbert_mlm"]
    cm = capture(case.build(), (), example_kwargs=case.kwargs(2))
    p = profile(cm, (), example_kwargs=case.kwargs(2), repeats=1)
    assert p.model_name == "DistilBertForMaskedLM"
    assert p.sizes == {"B": 2, "S": 8}
    assert any(n.info.module_path.startswith("distilbert.transformer.layer.1") for n in p.nodes)


def test_bad_input_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ProfileError, match=r"do not fit Sequential: RuntimeError.*hint"):
        profile(capture(model, (torch.randn(1, 3, 8, 8),)), (torch.randn(1, 5, 8, 8),))
    with pytest.raises(ProfileError, match=r"expected input\[1, 5, 8, 8\] to have 3 channels"):
        profile(model, (torch.randn(1, 5, 8, 8),))  # fx captures it; the first run names the problem
    with pytest.raises(CaptureError, match="could not capture"):
        capture(model, (torch.randn(1, 5, 8, 8),), method="export")  # export runs the model
    with pytest.raises(ProfileError, match=r"needs an nn\.Module"):
        profile("resnet", (torch.randn(1, 3, 8, 8),))  # type: ignore[arg-type]
    with pytest.raises(ProfileError, match=r"torch\.cuda\.is_available"):
        if not torch.cuda.is_available():
            profile(model, (torch.randn(1, 3, 8, 8),), device="cuda")
        else:
            raise ProfileError("torch.cuda.is_available")
    with pytest.raises(ProfileError, match="not a device"):
        profile(model, (torch.randn(1, 3, 8, 8),), device="gpu7")
    with pytest.raises(ProfileError, match="repeats must be >= 1"):
        profile(model, (torch.randn(1, 3, 8, 8),), repeats=0)


def test_public_surface() -> None:
    assert set(tspipe_fx.__all__) >= {"capture", "profile", "Profile", "CapturedModel", "CaptureError"}
    from tspipe_fx import passes

    assert passes.__name__ == "tspipe_fx.passes"
    assert Path(passes.__file__).parent.parent == Path(tspipe_fx.__file__).parent


def test_shipped_profiles_load_and_match_their_models() -> None:
    import torchvision

    from tspipe_fx.cost import profiles

    assert {"cpu/resnet50_b8", "cpu/vit_b16_b8", "cpu/bert_base_b8"} <= set(profiles.available())
    prof = profiles.load("cpu/resnet50_b8")
    x = torch.randn(8, 3, 224, 224)
    captured = capture(torchvision.models.resnet50(), (x,))
    prof.check(captured, captured.flatten_inputs((x,), {}))
    assert 0.5 < prof.fidelity_fwd_bwd < 2.0
    with pytest.raises(ProfileError, match=r"no shipped profile 'cpu/resnet9000_b8'; available: \["):
        profiles.load("cpu/resnet9000_b8")


@pytest.mark.parametrize("device_ms, host_bound", [(1.0, True), (1_000.0, False)])
def test_where_the_spin_cannot_tell_a_step_whose_device_idled_is_host_bound(
    monkeypatch: pytest.MonkeyPatch, device_ms: float, host_bound: bool
) -> None:
    """A part of more kernels than the launch queue holds always finds its spin over. Then the
    device's own work decides: a step whose device worked under 0.9 of its wall time was
    host-bound, and the host's return time of a plain step is the figure; else None."""
    import time

    from tspipe_fx.cost.launch import step_host_us

    fake_cuda(monkeypatch, lambda: True)  # the spin was always over
    x = torch.ones(4)

    def step() -> None:
        time.sleep(0.01)  # the wall time too: the faked device is done when the host returns
        (x + 1).mul_(2)

    assert step_host_us(step, "cuda:0", repeats=2) is None  # nothing to tell it by
    got = step_host_us(step, "cuda:0", repeats=2, device_ms=device_ms)
    assert (5_000 <= got[0] < 25_000) if host_bound else got is None
