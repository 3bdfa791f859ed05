import re
import shutil

import pytest
import torch

import fxfuse
from fxfuse.passes import partition_levels
from zoo import ResNetTiny, mlp, seeded


@pytest.fixture(scope="module")
def plan():
    return partition_levels(fxfuse.trace(seeded(ResNetTiny), torch.randn(2, 3, 8, 8)))


def test_dump_table_columns_and_rows(plan):
    lines = plan.dump().splitlines()
    assert lines[0].split() == ["index", "name", "kind", "width", "output", "shape", "params", "nodes"]
    assert len(lines) == 1 + len(plan)
    for lv, line in zip(plan, lines[1:]):
        cells = re.split(r"\s{2,}", line)
        assert cells == [
            str(lv.index), lv.name, lv.kind, str(lv.width), str(lv.output_shape),
            str(plan.param_count(lv)), str(len(lv.nodes)),
        ]


def test_param_counts_add_up_to_the_model():
    model = mlp()
    plan = partition_levels(fxfuse.trace(model, torch.randn(2, 16)))
    counts = [int(line.split()[-2]) for line in plan.dump().splitlines()[1:]]
    assert counts == [16 * 12 + 12, 12 * 10 + 10, 10 * 3 + 3]


def test_dot_has_one_cluster_per_level_holding_its_nodes(plan):
    dot = plan.to_dot()
    assert dot.startswith("digraph")
    clusters = re.findall(r"subgraph cluster_L(\d+) \{(.*?)\n  \}", dot, flags=re.S)
    assert [int(i) for i, _ in clusters] == list(range(len(plan)))
    for (i, body), lv in zip(clusters, plan):
        declared = re.findall(r'^\s+"([^"]+)" \[label=', body, flags=re.M)
        assert declared == list(lv.nodes)
    assert f'"{plan[0].output}" -> ' in dot


def test_save_txt_dot_html(tmp_path, plan):
    assert open(plan.save(tmp_path / "p.txt")).read().strip() == plan.dump()
    assert open(plan.save(tmp_path / "p.dot")).read() == plan.to_dot()
    page = open(plan.save(tmp_path / "p.html")).read()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    for lv in plan:
        assert f'id="L{lv.index}"' in page  # one band per level in the drawing
        assert f'href="#L{lv.index}">{lv.name}</a>' in page  # table row linking to it
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_save_svg_with_graphviz(tmp_path, plan):
    svg = open(plan.save(tmp_path / "p.svg")).read()
    assert "<svg" in svg
    for lv in plan:
        assert f"cluster_L{lv.index}" in svg


def test_save_svg_without_graphviz_says_how_to_install(tmp_path, plan, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(fxfuse.DumpError, match="apt-get install graphviz.*\\.html"):
        plan.save(tmp_path / "p.svg")
    assert not (tmp_path / "p.svg").exists()


def test_save_unknown_format(tmp_path, plan):
    with pytest.raises(ValueError, match=r"'\.png'.*\.txt, \.dot, \.svg, \.html"):
        plan.save(tmp_path / "p.png")


def test_html_level_bands_are_sequential_on_a_vit(tmp_path):
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    plan = partition_levels(fxfuse.trace(model, torch.randn(1, 3, 32, 32)))
    page = plan.to_html()
    bands = re.findall(r'<g id="L(\d+)" class="band"><rect x="4" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"', page)
    assert [int(i) for i, _, _ in bands] == list(range(len(plan)))
    tops = [(float(y), float(y) + float(h)) for _, y, h in bands]
    for (_, bottom), (top, _) in zip(tops, tops[1:]):
        assert top >= bottom - 1e-6  # no band overlaps the next
