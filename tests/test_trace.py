import pytest
import timm
import torch
import torch.fx
from torch import nn

import fxfuse
from zoo import ConvBN, GatedNet, Gate, TupleOutput, TwoInputs, mlp, seeded


def test_trace_returns_graphmodule_with_qualnames():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    gm = fxfuse.trace(model, torch.randn(2, 3, 32, 32))
    assert isinstance(gm, torch.fx.GraphModule)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv1.0", "layer1.0.conv1", "layer4.0.downsample.1", "fc"} <= targets
    assert not gm.training


def test_shape_meta_matches_real_activations():
    model = seeded(ConvBN)
    x = torch.randn(3, 3, 8, 8)
    seen = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
        for name in ("conv1", "bn2", "pool", "fc")
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    gm = fxfuse.trace(model, x)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in seen:
            assert node.meta["fxfuse"]["shape"] == tuple(seen[node.target])
            assert tuple(node.meta["tensor_meta"].shape) == tuple(seen[node.target])
            assert node.meta["fxfuse"]["dtype"] == torch.float32
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out.meta["fxfuse"]["shape"] == (3, 4)


def test_traced_module_computes_the_model():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fxfuse.trace(model, x)(x), model(x))


@pytest.mark.parametrize("name", ["vgg11", "mobilevit_xxs"])
def test_timm_notrace_registries_make_untraceable_models_trace(name):
    model = timm.create_model(name, pretrained=False, num_classes=4)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)  # plain torch.fx fails on these
    x = torch.randn(1, 3, 64, 64)
    gm = fxfuse.trace(model, x)
    torch.testing.assert_close(gm(x), model.eval()(x))


def test_timm_linear_stays_a_module_call_and_a_subclass_with_its_own_forward_does_not():
    from timm.layers import Linear

    from fxfuse.passes import affine_spec, partition_levels

    class Scaled(nn.Linear):  # a subclass that computes something else: traced through, not solved as a Linear
        def forward(self, x):
            return super().forward(2.0 * x)

    for cls, module_call in ((Linear, True), (Scaled, False)):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), cls(8, 3)).eval()
        gm = fxfuse.trace(model, torch.randn(2, 4))
        calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        assert ("2" in calls) == module_call
        x = torch.randn(5, 4)
        torch.testing.assert_close(gm(x), model(x))
        head = list(partition_levels(gm).split())[-1]
        assert (affine_spec(head) is not None) == module_call


def test_trace_leaves_model_untouched():
    model = seeded(ConvBN).train()
    model.bn1.eval()  # a mixed state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    gm = fxfuse.trace(model, torch.randn(4, 3, 8, 8) * 5)
    assert {name: m.training for name, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the GraphModule owns copies: editing it does not reach the model
    with torch.no_grad():
        gm.get_submodule("conv1").weight.add_(1.0)
    assert torch.equal(model.conv1.weight, before["conv1.weight"])


def test_data_dependent_control_flow_raises_trace_error_naming_module():
    with pytest.raises(fxfuse.TraceError, match=r"module `gate` \(Gate\).*x.sum\(\) > 0.*leaf_modules=\(Gate,\)"):
        fxfuse.trace(GatedNet(), torch.randn(2, 4))


def test_leaf_modules_fix_the_trace():
    model = GatedNet().eval()
    x = torch.randn(2, 4)
    for leaf in (Gate, "gate"):
        gm = fxfuse.trace(model, x, leaf_modules=(leaf,))
        assert "gate" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
        torch.testing.assert_close(gm(x), model(x))


def branchy(x):
    return x if x.sum() > 0 else -x


class BranchyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return branchy(self.fc(x))  # a module-level function: autowrap patches the forward's globals


def test_autowrap_functions_keep_a_function_opaque():
    Net = BranchyNet
    with pytest.raises(fxfuse.TraceError):
        fxfuse.trace(Net(), torch.randn(2, 4))
    gm = fxfuse.trace(Net(), torch.randn(2, 4), autowrap_functions=(branchy,))
    assert any(n.op == "call_function" and n.target is branchy for n in gm.graph.nodes)


def test_bad_arguments_raise_type_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxfuse.trace(lambda x: x, torch.randn(2))
    with pytest.raises(TypeError, match="example_inputs must be a Tensor"):
        fxfuse.trace(mlp(), [[1.0, 2.0]])
    with pytest.raises(TypeError, match="leaf_modules"):
        fxfuse.trace(mlp(), torch.randn(2, 16), leaf_modules=(3,))


def test_wrong_input_shape_names_the_node():
    with pytest.raises(fxfuse.TraceError, match=r"failed at node `_1`.*shape"):
        fxfuse.trace(mlp(d_in=16), torch.randn(2, 7))


def test_several_inputs_trace_and_tuple_outputs_trace():
    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    gm = fxfuse.trace(model, (x, y))
    torch.testing.assert_close(gm(x, y), model(x, y))
    with pytest.raises(TypeError, match="also needs y"):
        fxfuse.trace(model, x)
    gm = fxfuse.trace(TupleOutput(), torch.randn(2, 4))
    assert isinstance(gm(torch.randn(2, 4)), tuple)


def test_defaulted_forward_arguments_are_frozen():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxfuse.trace(model, x)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    torch.testing.assert_close(gm(x), model(x))


def test_postponed_annotations_do_not_break_torchscript(tmp_path):
    # a module whose source has `from __future__ import annotations` (as this test file's models may):
    # its forward annotation reaches torch.fx as the string "Tensor"
    ns: dict = {}
    exec(
        "from __future__ import annotations\n"
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        return self.fc(x)\n",
        ns,
    )
    x = torch.randn(2, 4)
    gm = fxfuse.trace(ns["Net"](), x)
    fxfuse.export(gm, tmp_path / "n.pt", x, format="torchscript")
