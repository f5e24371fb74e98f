"""Pictures of plans and schedules, and schedules simulated on a plan's costs."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch
from toys import Net, Online, Target

import tspipe_fx
from tspipe_fx import TspipeError
from tspipe_fx.plan import simulate_plan
from tspipe_fx.report.draw import STAGE_COLOURS, graph_dot, save_graph, save_stage_bars
from tspipe_fx.report.timeline import save_png
from tspipe_fx.schedule import make_schedule, simulate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipe() -> tspipe_fx.Pipeline:
    torch.manual_seed(0)
    return tspipe_fx.compile(Net(16, 4), Net(32, 4).eval(), 3, example_inputs=(torch.randn(6, 8),),
                             cost_model="uniform", batch_size=12)  # fmt: skip


def test_simulate_plan_reads_the_plans_stage_costs(pipe: tspipe_fx.Pipeline) -> None:
    plan = dataclasses.replace(pipe.plan, links=())  # transfers free: the stage costs alone
    cost = {}
    for j, (s, t) in enumerate(zip(plan.student.stages, plan.teacher.stages, strict=True)):
        cost["sf", j], cost["sb", j], cost["tf", j] = s.fwd_ms, s.bwd_ms, t.fwd_ms
    for name in ("tspipe", "gpipe", "1f1b"):
        by_hand = simulate(make_schedule(name, 3, plan.micro_batches, n_batches=6),
                           lambda t: cost.get((t.kind, t.stage), 0.0))  # fmt: skip
        assert simulate_plan(plan, name).period == pytest.approx(by_hand.period)
        assert simulate_plan(pipe.plan, name).period > by_hand.period  # the plan's links cost time
    # sequential: one micro-batch of the whole batch, each stage's work M times a micro-batch's
    m = plan.micro_batches
    by_hand = simulate(make_schedule("sequential", 3, 1, n_batches=6), lambda t: m * cost.get((t.kind, t.stage), 0.0))
    assert simulate_plan(plan, "sequential").period == pytest.approx(by_hand.period)
    tspipe, gpipe = simulate_plan(plan, "tspipe").period, simulate_plan(plan, "gpipe").period
    assert tspipe < gpipe  # the teacher fills the bubbles


def test_simulate_plan_links_and_views() -> None:
    online = Online()
    pipe = tspipe_fx.compile(online, Target(online), 2, example_inputs=(torch.randn(4, 8),), mode="momentum",
                             cost_model="uniform")  # fmt: skip
    free = simulate_plan(pipe.plan, "tspipe")
    assert free.schedule.views == 2 and free.schedule.mode == "momentum"  # BYOL's two views by default
    assert simulate_plan(pipe.plan, "tspipe", views=1).schedule.views == 1
    # 1 KB/s: every transfer costs a visible time, so the period grows
    slow = simulate_plan(pipe.plan, "tspipe", link=(1e-6, 0.0))
    assert slow.period > free.period


def test_stage_bars_and_gantt_pngs(pipe: tspipe_fx.Pipeline, tmp_path: Path) -> None:
    save_stage_bars(pipe.plan, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    both = [simulate_plan(pipe.plan, name, n_batches=3) for name in ("tspipe", "gpipe")]
    save_png(both, str(tmp_path / "two.png"), title="tspipe and gpipe")
    assert (tmp_path / "two.png").read_bytes()[:8] == PNG
    with pytest.raises(Exception, match="at least one timeline"):
        save_png([], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_graph_dot_colours_nodes_by_stage_and_marks_the_cuts(pipe: tspipe_fx.Pipeline) -> None:
    dot = graph_dot(pipe)
    assert dot.startswith("digraph tspipe {") and dot.endswith("}")
    for role, mp in (("student", pipe.plan.student), ("teacher", pipe.plan.teacher)):
        for k, stage in enumerate(mp.stages):
            for name in stage.nodes:
                line = next(ln for ln in dot.splitlines() if ln.strip().startswith(f'"{role}.{name}" ['))
                assert f'fillcolor="{STAGE_COLOURS[k]}40"' in line and f"stage {k}" in line
        stage_of = {name: k for k, st in enumerate(mp.stages) for name in st.nodes}
        bold = re.findall(rf'"{role}\.(\w+)" -> "{role}\.(\w+)" \[penwidth=2.5', dot)
        assert bold and all(stage_of[a] != stage_of[b] for a, b in bold)
        # every value a stage receives is on a bold edge into that stage
        for k, stage in enumerate(mp.stages[1:], start=1):
            produced = {a for a, b in bold if stage_of[b] == k}
            assert set(stage.inputs) <= produced | {n for n in stage.inputs if n not in stage_of}


def test_save_graph_dot_text_and_the_missing_renderer(pipe: tspipe_fx.Pipeline, tmp_path: Path) -> None:
    save_graph(pipe, tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == graph_dot(pipe)
    if importlib.util.find_spec("pydot") is None:
        with pytest.raises(TspipeError, match="needs pydot and graphviz; hint: pip install pydot"):
            save_graph(pipe, tmp_path / "g.png")
        assert not (tmp_path / "g.png").exists()
    elif shutil.which("dot") is not None:
        save_graph(pipe, tmp_path / "g.png")
        assert (tmp_path / "g.png").read_bytes()[:8] == PNG
