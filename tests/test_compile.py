"""tspipe_fx.compile: plans, stages, reports, manual control and bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from zoo import BY_NAME

import tspipe_fx
from tspipe_fx import PartitionError, Plan, TspipeError
from tspipe_fx.cost import UniformCost
from tspipe_fx.cost.devices import DeviceSpec
from tspipe_fx.stage import run_stages


@pytest.fixture(scope="module")
def kd() -> tspipe_fx.Pipeline:
    torch.manual_seed(0)
    student = BY_NAME["timm_resnet18"].build()
    teacher = BY_NAME["timm_vit"].build().eval()
    return tspipe_fx.compile(student, teacher, 3, example_inputs=(torch.randn(6, 3, 32, 32),))


def test_kd_plan_and_stages(kd: tspipe_fx.Pipeline) -> None:
    plan = kd.plan
    assert plan.mode == "kd" and plan.n_stages == 3 and plan.micro_batches == 3 and plan.batch_size == 6
    assert plan.cost_model == "measured" and plan.devices == ("cpu",) * 3
    assert len(kd.student_stages) == len(kd.teacher_stages) == 3
    assert all(isinstance(m, torch.fx.GraphModule) for m in kd.student_stages + kd.teacher_stages)
    assert plan.max_load_ms == max(plan.loads_ms) >= plan.lower_bound_ms > 0
    # The stages cover every compute node once, in order; their names are the plan's.
    names = [n for s in plan.student.stages for n in s.nodes]
    assert len(names) == len(set(names)) and plan.student.cuts == tuple(
        s.nodes[0] for s in plan.student.stages[1:]
    )
    # Explicit named inputs and outputs, chained.
    for a, b in zip(kd.student_io, kd.student_io[1:], strict=False):
        assert a.outputs == b.inputs
    assert [tuple(n.target for n in m.graph.nodes if n.op == "placeholder") for m in kd.student_stages] == [
        s.inputs for s in plan.student.stages
    ]
    # The compiled stages compute the captured models.
    x = torch.randn(4, 3, 32, 32)
    kd.teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(run_stages(kd.teacher_io, [x])[0], kd.teacher.graph_module(x)[0])


def test_plan_round_trips_and_rebuilds_the_same_stages(kd: tspipe_fx.Pipeline, tmp_path: object) -> None:
    plan = kd.plan
    assert Plan.from_json(plan.to_json()) == plan
    again = tspipe_fx.compile(
        kd.student,
        kd.teacher,
        3,
        example_inputs=(torch.randn(6, 3, 32, 32),),
        plan=plan,
        cost_model="uniform",
    )
    for a, b in ((kd.student_io, again.student_io), (kd.teacher_io, again.teacher_io)):
        assert [s.nodes for s in a] == [s.nodes for s in b]
        assert [s.module.code for s in a] == [s.module.code for s in b]
    with pytest.raises(TspipeError, match="not a tspipe_fx plan"):
        Plan.from_json(plan.to_json().replace('"mode"', '"mood"'))


def test_a_saved_plan_is_rebuilt_on_its_own_costs(kd: tspipe_fx.Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile(plan=p) without a cost model keeps p's stage costs, figures and schedule, and
    profiles nothing; another micro-batch size or a cost model given prices the plan anew."""
    plan = dataclasses.replace(kd.plan, schedule="auto", loss="micro")
    x = torch.randn(6, 3, 32, 32)

    def no_profiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a saved plan's costs were measured again")

    with monkeypatch.context() as m:
        m.setattr(tspipe_fx.compiler.costs, "profile", no_profiling)
        again = tspipe_fx.compile(kd.student, kd.teacher, 3, example_inputs=(x,), plan=plan).plan
    assert again.cost_model == plan.cost_model == "measured"
    for a, b in ((plan.student, again.student), (plan.teacher, again.teacher)):
        for s, t in zip(a.stages, b.stages, strict=True):
            assert t.fwd_ms == pytest.approx(s.fwd_ms, rel=1e-9) and t.bwd_ms == pytest.approx(s.bwd_ms, rel=1e-9)
            # (bytes are whole per node: each node's share is rounded)
            assert t.activation_bytes == pytest.approx(s.activation_bytes, abs=len(s.nodes))
    assert again.loads_ms == pytest.approx(plan.loads_ms, rel=1e-9)
    assert again.memory_bytes == pytest.approx(plan.memory_bytes, rel=1e-6)
    assert again.lower_bound_ms == pytest.approx(plan.lower_bound_ms, rel=1e-9)
    assert again.build_schedule(3).devices == plan.build_schedule(3).devices  # auto, made for the same costs
    # Priced anew: a cost model given, or micro-batches of another size (the costs were for 2 samples).
    uniform = tspipe_fx.compile(kd.student, kd.teacher, 3, example_inputs=(x,), plan=plan, cost_model="uniform")
    assert uniform.plan.cost_model == "uniform" and uniform.plan.student.cuts == plan.student.cuts
    assert uniform.plan.student.stages[0].fwd_ms != plan.student.stages[0].fwd_ms
    with monkeypatch.context() as m:
        m.setattr(tspipe_fx.compiler.costs, "profile", no_profiling)
        with pytest.raises(AssertionError, match="measured again"):
            tspipe_fx.compile(kd.student, kd.teacher, 3, example_inputs=(x,), plan=plan, micro_batches=2)


def test_with_plan_recuts_the_same_models(kd: tspipe_fx.Pipeline) -> None:
    """Another process's plan for the same models (the distributed runtime's rank 0)."""
    other = tspipe_fx.compile(kd.student, kd.teacher, 3, example_inputs=(torch.randn(6, 3, 32, 32),),
                              cost_model="params")  # fmt: skip
    assert other.plan.student.cuts != kd.plan.student.cuts
    again = other.with_plan(kd.plan)
    assert again.plan is kd.plan
    assert [s.nodes for s in again.student_io] == [s.nodes for s in kd.student_io]
    assert [s.nodes for s in again.teacher_io] == [s.nodes for s in kd.teacher_io]


def test_report_labels_stages_by_module_path() -> None:
    """Issue 13.13: stage labels were raw node names (eq_19, getattr_40) and "(top)" where the
    first node belonged to no module; they are the span of the module paths the stage holds."""

    class Glue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x * 2)  # the graph starts with a node of no module
            return self.head(self.body(h) + h)

    pipe = tspipe_fx.compile(Glue(), Glue().eval(), 2, example_inputs=(torch.randn(4, 8),), balance=([3, 4], [3, 4]),
                             cost_model="uniform")  # fmt: skip
    first = pipe.plan.student.stages[0]
    assert "mul" in first.nodes[:2] and first.first_module == "stem"
    rows = [line for line in pipe.report().splitlines() if line.lstrip().startswith(("0 ", "1 "))]
    assert rows[0].split()[2:5] == ["stem", "..", first.last_module]
    assert "(top)" not in pipe.report() and "mul" not in pipe.report()
    # torch.export marks nodes of no module (size queries) with a placeholder stack entry.
    from zoo import BY_NAME

    case = BY_NAME["hf_distilbert_mlm"]
    pipe = tspipe_fx.compile(case.build(), case.build().eval(), 2, example_inputs=(), example_kwargs=case.kwargs(4),
                             cost_model="uniform")  # fmt: skip
    report = pipe.report()
    assert pipe.plan.student.method == "export" and "_empty_nn_module_stack" not in report
    assert pipe.plan.student.stages[0].first_module.startswith("distilbert.embeddings")


def test_report(kd: tspipe_fx.Pipeline) -> None:
    text = kd.report()
    lines = text.splitlines()
    assert lines[0].startswith("ResNet (student, fx) and VisionTransformer (teacher, fx), mode kd, 3 stages")
    assert "student modules" in lines[1] and "load ms" in lines[1]
    stage_rows = lines[: next(i for i, line in enumerate(lines) if line.startswith("schedule"))]
    assert sum(1 for line in stage_rows if line.lstrip().startswith(("0 ", "1 ", "2 "))) == 3
    memory = lines[next(i for i, line in enumerate(lines) if line.startswith("predicted memory per device")):]
    assert "peak MB" in memory[1] and sum(1 for line in memory if line.lstrip().startswith(("0 ", "1 ", "2 "))) == 3
    assert any(line.startswith("period") and "ms per batch (the schedule run on these costs" in line for line in lines)
    assert any(line.startswith("busiest device") and "(device " in line for line in lines)
    assert any(line.startswith("efficiency") for line in lines)
    assert any(line.startswith("imbalance") for line in lines)
    assert any(line.startswith("throughput") and "samples/s" in line for line in lines)
    assert any(line.startswith("equal nodes:") and "x ours" in line for line in lines)
    assert any(line.startswith("equal parameters:") for line in lines)
    # The cost model's own optimum is never worse than a policy's, under its own costs.
    assert all(period >= kd.plan.max_load_ms * (1 - 1e-9) for _, period in kd.plan.baselines)


def test_hf_pair_with_tied_weights() -> None:
    student, teacher = BY_NAME["hf_distilbert_mlm"], BY_NAME["hf_bert_mlm"]
    kwargs = student.kwargs(4)
    pipe = tspipe_fx.compile(
        student.build(), teacher.build(), 2, example_inputs=(), example_kwargs=kwargs, cost_model="roofline"
    )
    assert pipe.plan.student.method == pipe.plan.teacher.method == "export"
    assert [names for names, _ in pipe.plan.student.tie_groups] == [
        ("distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight")
    ]
    assert "tied (student)" in pipe.report()


class Byol(nn.Module):
    """A BYOL-style online network: backbone, projector, and a predictor the target lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(6)))
        self.projector = nn.Linear(16, 8)
        self.predictor = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))


class Target(nn.Module):
    def __init__(self, online: Byol) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def test_momentum_cuts_mirror_the_student() -> None:
    online = Byol()
    pipe = tspipe_fx.compile(
        online, Target(online), 3, example_inputs=(torch.randn(6, 16),), mode="momentum", cost_model="uniform"
    )
    for s, t in zip(pipe.student_stages, pipe.teacher_stages, strict=True):
        teacher_params = set(dict(t.named_parameters()))
        student_params = set(dict(s.named_parameters()))
        assert teacher_params == {p for p in student_params if not p.startswith("predictor")}
    assert all(p.startswith("predictor") is False for p in dict(pipe.student_stages[0].named_parameters()))
    assert any(p.startswith("predictor") for p in dict(pipe.student_stages[-1].named_parameters()))


def test_momentum_name_mismatch_is_an_error() -> None:
    online = Byol()
    target = Target(online)
    target.extra = nn.Linear(8, 8)  # a parameter the student lacks

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = target

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.t.extra(self.t(x))

    with pytest.raises(
        TspipeError, match=r"momentum teacher parameters without a student parameter .*t\.backbone"
    ):
        tspipe_fx.compile(
            online, Bad(), 2, example_inputs=(torch.randn(4, 16),), mode="momentum", cost_model="uniform"
        )


def _byol(n: int = 2, **kwargs: object) -> tspipe_fx.Pipeline:
    """Compile a fresh BYOL pair (momentum mode, uniform costs unless overridden)."""
    online = Byol()
    options: dict[str, object] = {"mode": "momentum", "cost_model": "uniform", **kwargs}
    return tspipe_fx.compile(online, Target(online), n, example_inputs=(torch.randn(4, 16),), **options)  # type: ignore[arg-type]


def test_manual_balance() -> None:
    counts = _byol(balance=[6, 10])
    assert [len(s.nodes) for s in counts.plan.student.stages] == [6, 10]
    named = _byol(balance=["backbone.3"])
    assert named.plan.student.cuts == ("backbone_3_0",) and named.plan.teacher.cuts == ("backbone_3_0",)
    assert named.plan.baselines == ()
    with pytest.raises(TspipeError, match=r"balance \[6, 9\] sums to 15, but the graph has 16 compute nodes"):
        _byol(balance=[6, 9])
    with pytest.raises(
        TspipeError, match=r"no module 'layer9' in the graph; top-level modules: \['backbone'"
    ):
        _byol(balance=["layer9"])
    with pytest.raises(TspipeError, match="in KD mode balance must be a"):
        _byol(balance=[6, 10], mode="kd")


def test_heterogeneous_devices_take_work_by_speed() -> None:
    def spec(name: str, tflops: float) -> DeviceSpec:
        return DeviceSpec(name, {"float32": tflops}, memory_bandwidth_gbs=1e3, memory_bytes=2**30,
                          link_bandwidth_gbs=1e6, link_latency_us=0)  # fmt: skip

    s0, s1 = _byol(
        cost_model=UniformCost(), device_specs=[spec("fast", 3.0), spec("slow", 1.0)]
    ).plan.student.stages
    assert len(s0.nodes) > len(s1.nodes)


def test_memory_limit() -> None:
    with pytest.raises(
        PartitionError, match=r"device 0 would need [\d.]+ KiB \([\d,]+ bytes\) of its 1,000 bytes \(predicted "
        r"peak, recompute 'never'\).*the leanest partition found needs [\d.]+ KiB \([\d,]+ bytes\) per device; hint"
    ):
        _byol(memory_limit=1000)
    assert max(_byol(memory_limit=10**6).plan.memory_bytes) <= 10**6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_gpus": 0}, TspipeError, r"n_gpus must be an integer >= 1, got 0"),
        ({"n_gpus": 40, "micro_batches": 1}, PartitionError, r"candidate cuts: too few for 40 stages"),
        ({"mode": "ema"}, TspipeError, r"mode must be 'kd' or 'momentum', got 'ema'"),
        ({"micro_batches": 8}, TspipeError, r"the batch has 4 samples, fewer than micro_batches=8"),
        (
            {"devices": ["cuda:3", "cpu"]},
            TspipeError,
            r"device cuda:3 does not exist: this machine has \d+ CUDA devices",
        ),
        ({"devices": ["cpu"]}, TspipeError, r"2 stages need 2 devices, got 1"),
        ({"cost_model": "flops"}, TspipeError, r"unknown cost_model 'flops'"),
        ({"memory_limit": [1, 2, 3]}, TspipeError, r"2 devices need 2 memory limits, got 3"),
        ({"device_specs": ["tpu", "cpu"]}, TspipeError, r"unknown device spec 'tpu'"),
    ],
)
def test_bad_input(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    online = Byol()
    args = {"n_gpus": 2, "example_inputs": (torch.randn(4, 16),), "cost_model": "uniform", **kwargs}
    n = args.pop("n_gpus")
    with pytest.raises(error, match=match):
        tspipe_fx.compile(online, Target(online), n, **args)  # type: ignore[arg-type]


def test_batch_size_larger_than_the_example() -> None:
    small = _byol(cost_model="roofline")
    large = _byol(cost_model="roofline", batch_size=4096)
    assert large.plan.batch_size == 4096 and large.plan.micro_batches == 2
    assert large.plan.student.stages[0].fwd_flops == 1024 * small.plan.student.stages[0].fwd_flops
    with pytest.raises(TspipeError, match="batch_size must be an integer >= 1"):
        _byol(batch_size=0)


def test_non_module_is_an_error() -> None:
    with pytest.raises(TspipeError, match=r"the teacher must be an nn\.Module, got str"):
        tspipe_fx.compile(Byol(), "vit", 2, example_inputs=(torch.randn(4, 16),))  # type: ignore[arg-type]


def test_score_any_cuts(kd: tspipe_fx.Pipeline) -> None:
    s_cuts = [kd.student_chain.position_of(name) for name in kd.plan.student.cuts]
    t_cuts = [kd.teacher_chain.position_of(name) for name in kd.plan.teacher.cuts]
    assert kd.score(s_cuts, t_cuts).loads_ms == kd.plan.loads_ms
    worse = kd.score([1, 2], [1, 2])  # any positions, candidates or not
    assert worse.period_ms > kd.plan.max_load_ms


def test_graph_errors_come_before_any_profiling(monkeypatch: pytest.MonkeyPatch) -> None:
    import tspipe_fx.compiler.costs

    def no_profiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled before checking the request")

    monkeypatch.setattr(tspipe_fx.compiler.costs, "profile", no_profiling)
    online = Byol()
    x = (torch.randn(4, 16),)
    with pytest.raises(TspipeError, match="sums to 3"):
        tspipe_fx.compile(online, Target(online), 2, example_inputs=x, mode="momentum", balance=[1, 2])
    with pytest.raises(PartitionError, match="too few for 40 stages"):
        tspipe_fx.compile(online, Target(online), 40, example_inputs=x, micro_batches=1)


def test_the_symbolic_run_and_the_fingerprint_happen_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A measured compile profiles both models; the profile reuses the graph's symbolic results
    (one fake-tensor run per model), and every check reuses the graph's fingerprint."""
    import hashlib

    import tspipe_fx.api
    import tspipe_fx.cost.profiling
    from tspipe_fx.passes import symbolic

    runs: list[int] = []
    real = symbolic.annotate_symbolic

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        runs.append(id(gm))
        return real(gm, inputs)

    monkeypatch.setattr(tspipe_fx.compiler.capture, "annotate_symbolic", counting)
    monkeypatch.setattr(tspipe_fx.cost.profiling, "annotate_symbolic", counting)
    hashes: list[bytes] = []
    real_sha = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": hashes.append(data) or real_sha(data))
    from toys import Net

    torch.manual_seed(0)
    pipe = tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),))  # measured
    assert len(runs) == 2 and pipe.plan.cost_model == "measured"
    fingerprints = [h for h in hashes if h.startswith(b'[["placeholder"')]  # torch hashes things of its own
    assert len(fingerprints) == 2  # one per graph: the profiles, their checks and the plan share it
    assert tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), plan=pipe.plan,
                             cost_model="uniform").plan.student.cuts == pipe.plan.student.cuts  # fmt: skip
