"""`generation.linear` on the CPU: which linear layers are fused and what fusing keeps, the merge of a
fused group's calls, and a fused decoder layer compiled by inductor (the server's backend) computing
each group's product once. The kernel itself runs on a GPU (`tests/test_cuda.py`)."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tests.families import build
from trickle.generation import linear
from trickle.generation.models import decoder_layers


def test_merge_repeats_keeps_one_of_the_linear_calls_that_take_the_same_arguments() -> None:
    """Calls with the same input, weight and bias become one, whose users are the others' users; calls
    that differ in any argument stay."""
    x, w, other = torch.randn(2, 8), torch.randn(12, 8), torch.randn(12, 8)

    def f(x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        a = torch.ops.trickle.linear(x, w, None)[:, :4]
        b = torch.ops.trickle.linear(x, w, None)[:, 4:]
        c = torch.ops.trickle.linear(x, other, None)[:, :4]
        d = torch.ops.trickle.linear(x * 2, w, None)[:, :4]
        return torch.cat([a, b, c, d], dim=1)

    traced = torch.fx.symbolic_trace(f)
    assert linear.merge_repeats(traced.graph) == 1
    traced.recompile()
    assert sum(node.target in linear.OPS for node in traced.graph.nodes) == 3
    assert torch.equal(traced(x, w, other), f(x, w, other))


def test_fused_linear_layers_compute_what_they_did_eagerly() -> None:
    """Fusing makes the members' weights views of one matrix: eager forwards give the same bits, and
    members with and without a bias, or of another input width, are never grouped."""
    torch.manual_seed(0)
    q, k = torch.nn.Linear(8, 6, bias=True), torch.nn.Linear(8, 3, bias=True)
    plain, wide = torch.nn.Linear(8, 5, bias=False), torch.nn.Linear(16, 4, bias=True)
    block = torch.nn.ModuleList([q, k, plain, wide])
    x, y = torch.randn(2, 8), torch.randn(2, 16)
    before = [q(x), k(x), plain(x), wide(y)]
    groups = linear.siblings([block], lambda: (q(x), k(x), plain(x), wide(y)))
    assert groups == [[q, k]]
    linear.fuse(groups[0])
    assert q.weight.data_ptr() == q.fused_weight.data_ptr() and k.fused_weight is q.fused_weight
    assert (
        k.weight.data_ptr() == q.fused_weight[6:].data_ptr()
        and k.bias.data_ptr() == q.fused_bias[6:].data_ptr()
    )
    assert all(torch.equal(a, b) for a, b in zip([q(x), k(x), plain(x), wide(y)], before, strict=True))


def test_a_fused_layer_compiled_by_inductor_computes_each_groups_product_once() -> None:
    """A Llama layer's query, key and value and its gate and up projections, fused and compiled with the
    server's backend (merge, then inductor): four products in the generated code (the two groups, the
    output and down projections), and the layer's output as it is uncompiled."""
    with warnings.catch_warnings():  # inductor's modules note deprecations of torch's own on import
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._inductor.compile_fx
        from torch._inductor.utils import run_and_get_code
    model = build("llama", 100, 0).requires_grad_(False)
    layers = decoder_layers(model.base_model)
    ids = torch.tensor([[5, 6, 7]])
    for group in linear.siblings(layers, lambda: model(ids)):
        linear.fuse(group)
    calls: dict[str, Any] = {}
    hook = layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: calls.setdefault("first", (args, kwargs)), with_kwargs=True
    )
    model(ids, use_cache=False)
    hook.remove()
    args, kwargs = calls["first"]
    linear.use_in_compiled(layers[0])
    try:
        forward = torch.compile(type(layers[0]).forward, backend=linear.merging_repeats("inductor"))
        got, code = run_and_get_code(forward, layers[0], *args, **kwargs)
    finally:
        linear.restore(layers[0])
    want = type(layers[0]).forward(layers[0], *args, **kwargs)
    got, want = (out[0] if isinstance(out, tuple) else out for out in (got, want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    products = [line for text in code for line in text.splitlines() if "= torch.ops.trickle.linear" in line]
    assert len(products) == 4


def test_only_plain_linear_layers_are_routed_through_the_operator_and_restored() -> None:
    """`use_in_compiled` leaves a linear layer whose forward something else replaced (accelerate's
    offloading hooks, say) as it is, and `restore` takes back only what it set."""
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    wrapped = types.MethodType(lambda self, x: x * 2, block[1])
    block[1].forward = wrapped
    block[2]._hf_hook = object()  # what accelerate sets on a layer it offloads
    linear.use_in_compiled(block)
    assert vars(block[0])["forward"].__func__ is linear._forward
    assert vars(block[1])["forward"] is wrapped and "forward" not in vars(block[2])
    x = torch.randn(2, 4)
    assert torch.equal(block[0](x), torch.nn.functional.linear(x, block[0].weight, block[0].bias))
    linear.restore(block)
    assert "forward" not in vars(block[0]) and vars(block[1])["forward"] is wrapped


def _compiled_with_backend(
    function: Callable[..., Any],
) -> tuple[Callable[..., Any], list[torch.fx.GraphModule]]:
    """`function` compiled with the server's backend (`merging_repeats`) around a plain one that keeps
    each graph it is given (after the backend's rewrites) and runs it as it is; and those graphs."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    return torch.compile(function, backend=linear.merging_repeats(capture), dynamic=None), graphs


def _products(x: torch.Tensor, w: torch.Tensor, down: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    # Falcon's shape: a fused product's last columns activated, the rest sliced off; a product with
    # another product and a residual added to it, through a dropout that does nothing. Llama's: a
    # gated product, with a residual added to it. OPT's: an activated product, a residual added.
    out = torch.ops.trickle.linear(x, w, None)
    kept, hidden = out[..., :8], F.gelu(out[..., 8:])
    y = torch.ops.trickle.linear(hidden, down, None)
    y += kept
    y = F.dropout(y, p=0.0, training=False)
    tanh = F.gelu(torch.ops.trickle.linear(x, w[8:], None)[..., 8:], approximate="tanh")  # not folded
    shared = torch.ops.trickle.linear(x, w[:8], None)  # two users: not folded
    broadcast = torch.ops.trickle.linear(x, w[:8], None) + res[..., :1]  # another shape: not folded
    into = res * 2
    into += torch.ops.trickle.linear(x, w[16:], None)  # written into another tensor: not folded
    gate_up = torch.ops.trickle.linear(x, down, None)
    gated = res[..., :4] + F.silu(gate_up[..., :4]) * gate_up[..., 4:]
    unfused = res + F.relu(torch.ops.trickle.linear(x, w[2:10], None))  # OPT's: the whole product activated
    return torch.cat([res + y, tanh[..., :8], shared + res, shared, broadcast, gated, into, unfused], dim=-1)


def test_one_row_graphs_fold_activations_and_additions_into_their_products() -> None:
    """`fuse_epilogues`, as the compile backend runs it: in a graph traced for one row, a product's
    activated slice and the tensors added to it become one `trickle::linear_epilogue` call, which
    computes the same bits as the operators it replaced (bfloat16, each result rounded); so do a gated
    product (`act(gate) * up`) and what is added to it; what it cannot
    fold stays; a graph of a symbolic batch is left alone."""
    torch.manual_seed(0)
    w, down = torch.randn(24, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    compiled, graphs = _compiled_with_backend(_products)
    for rows in (1, 3, 5):
        x, res = torch.randn(rows, 1, 16, dtype=torch.bfloat16), torch.randn(rows, 1, 8, dtype=torch.bfloat16)
        assert torch.equal(compiled(x, w, down, res), _products(x, w, down, res))
    one, symbolic = graphs
    folded = [(n.args[3:7], len(n.args[7])) for n in one.graph.nodes if n.target in linear.EPILOGUE_OPS]
    assert folded == [
        (("gelu", 8, 24, -1), 0),
        (("silu", 0, 4, 4), 1),
        (("relu", 0, 8, -1), 1),
        (("", 0, 0, -1), 2),
    ]
    assert sum(n.target in linear.OPS for n in one.graph.nodes) == 4  # tanh, shared, broadcast, into
    assert not any(n.target in linear.EPILOGUE_OPS for n in symbolic.graph.nodes)


def _parallel(x: torch.Tensor, w: torch.Tensor, dense: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    # A parallel-attention layer (Falcon's): one product read by attention (here small operators) and the
    # MLP; the MLP's down projection added to the attention's output projection, then the residual.
    both = torch.ops.trickle.linear(x, w, None)
    attended = torch.tanh(both[..., :8]) * 2
    mlp = torch.ops.trickle.linear(F.gelu(both[..., 8:]), down, None)
    mlp += torch.ops.trickle.linear(attended, dense, None)
    out = mlp + x[..., :8]
    # a product added to its own input: that input depends on it, it is not run aside
    again = torch.ops.trickle.linear(out, dense, None)
    return torch.ops.trickle.linear(again, dense, None) + again


def test_a_product_added_to_one_it_does_not_need_runs_aside_and_stays_exact() -> None:
    """`run_aside`, as the compile backend runs it, in a graph traced for one row: the MLP's down
    projection, which the attention's output projection is added to, becomes a `linear_aside` call placed
    right after its input is ready (before the attention's operators), and the output projection's kernel
    adds it and the residual (`joins`). The same bits as uncompiled; a sequential product is left alone,
    and so is a graph of a symbolic batch."""
    torch.manual_seed(0)
    w, dense, down = (torch.randn(*shape, dtype=torch.bfloat16) for shape in ((24, 16), (8, 8), (8, 16)))
    compiled, graphs = _compiled_with_backend(_parallel)
    for rows in (1, 3, 5):
        x = torch.randn(rows, 1, 16, dtype=torch.bfloat16)
        assert torch.equal(compiled(x, w, dense, down), _parallel(x, w, dense, down))
    one, symbolic = graphs
    nodes = list(one.graph.nodes)
    asides = [n for n in nodes if n.target in linear.ASIDE_OPS]
    assert len(asides) == 1 and asides[0].args[1].name == "l_down_"  # type: ignore[union-attr]
    tanh = next(n for n in nodes if n.target is torch.tanh)
    assert nodes.index(asides[0]) < nodes.index(tanh)
    joined = [n for n in nodes if n.target in linear.EPILOGUE_OPS and n.args[8:] == (True,)]
    assert len(joined) == 1
    assert joined[0].args[1].name == "l_dense_" and joined[0].args[7][0] is asides[0]  # type: ignore[index, union-attr]
    assert not any(n.target in linear.ASIDE_OPS for n in symbolic.graph.nodes)


def _neox(
    x: torch.Tensor, qkv: torch.Tensor, dense: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    # GPT-NeoX's parallel layer, as the program traces it: attention (here small operators) first, then
    # the MLP on the layer's own input, dropouts that do nothing given their arguments in place, and
    # the attention's output projection added to the MLP's (the product the epilogue folds first).
    attended = torch.tanh(torch.ops.trickle.linear(x, qkv, None)) * 2
    attn = F.dropout(torch.ops.trickle.linear(attended, dense, None), 0.0, False, False)
    hidden = F.gelu(torch.ops.trickle.linear(F.layer_norm(x, (16,)), up, None))
    mlp = F.dropout(torch.ops.trickle.linear(hidden, down, None), 0.0, False, False)
    return mlp + attn + x


def test_the_product_whose_input_is_ready_sooner_runs_aside_with_what_it_needs_moved_up() -> None:
    """Where the MLP comes after the attention in the program but reads only the layer's input (GPT-NeoX,
    GPT-J, Phi), `run_aside` runs the MLP's down projection aside, not the attention's output
    projection: the MLP's norm and up projection move up to the top, the down projection starts right
    after them, before the attention's operators, and the output projection's kernel, its epilogue as
    before, waits for it. The same bits as uncompiled."""
    torch.manual_seed(0)
    shapes = ((16, 16), (16, 16), (32, 16), (16, 32))
    qkv, dense, up, down = (torch.randn(*shape, dtype=torch.bfloat16) for shape in shapes)
    compiled, graphs = _compiled_with_backend(_neox)
    for rows in (1, 3, 5):
        x = torch.randn(rows, 1, 16, dtype=torch.bfloat16)
        assert torch.equal(compiled(x, qkv, dense, up, down), _neox(x, qkv, dense, up, down))
    one, symbolic = graphs
    nodes = list(one.graph.nodes)
    aside = next(n for n in nodes if n.target in linear.ASIDE_OPS)
    assert aside.args[1].name == "l_down_"  # type: ignore[union-attr]
    tanh = next(n for n in nodes if n.target is torch.tanh)
    norm = next(n for n in nodes if n.target is F.layer_norm)
    assert nodes.index(norm) < nodes.index(aside) < nodes.index(tanh)
    (joined,) = [n for n in nodes if n.target in linear.EPILOGUE_OPS and n.args[8:] == (True,)]
    assert joined.args[1].name == "l_dense_" and joined.args[7][0] is aside  # type: ignore[index, union-attr]
    assert not any(n.target in linear.ASIDE_OPS for n in symbolic.graph.nodes)


def _written_between(
    x: torch.Tensor, qkv: torch.Tensor, dense: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    # As `_neox`, but the MLP reads a tensor written in place after the attention: what reads it may not
    # move above that write.
    copy = x.clone()
    attended = torch.tanh(torch.tanh(torch.ops.trickle.linear(x, qkv, None)) * 2) + 1
    attn = F.dropout(torch.ops.trickle.linear(attended, dense, None), 0.0, False, False)
    copy.mul_(qkv[0])
    hidden = F.gelu(torch.ops.trickle.linear(F.layer_norm(copy, (16,)), up, None))
    mlp = F.dropout(torch.ops.trickle.linear(hidden, down, None), 0.0, False, False)
    return mlp + attn + x


def test_nothing_moves_above_a_write_into_what_it_reads() -> None:
    """`run_aside` moves what the product run aside (the MLP's down projection) needs up to its inputs,
    but not across an operator that writes in place: the MLP's norm stays after the write into the
    tensor it reads, and the output is the same bits as uncompiled."""
    torch.manual_seed(0)
    shapes = ((16, 16), (16, 16), (32, 16), (16, 32))
    qkv, dense, up, down = (torch.randn(*shape, dtype=torch.bfloat16) for shape in shapes)
    compiled, graphs = _compiled_with_backend(_written_between)
    x = torch.randn(1, 1, 16, dtype=torch.bfloat16)
    assert torch.equal(compiled(x, qkv, dense, up, down), _written_between(x, qkv, dense, up, down))
    nodes = list(graphs[0].graph.nodes)
    write = next(n for n in nodes if n.op == "call_method" and n.target == "mul_")
    norm = next(n for n in nodes if n.target is F.layer_norm)
    aside = next(n for n in nodes if n.target in linear.ASIDE_OPS)
    assert aside.args[1].name == "l_down_"  # type: ignore[union-attr]
    assert nodes.index(write) < nodes.index(norm) < nodes.index(aside)


def test_the_epilogue_operator_computes_what_the_operators_it_replaces_compute() -> None:
    """Off the kernel (a CPU), `linear_epilogue` is the product, its activation over the columns given,
    then each addend added, each result rounded to the output's type: the same bits as those operators."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 16, dtype=torch.bfloat16), torch.randn(12, 16, dtype=torch.bfloat16)
    bias, a, b = (torch.randn(1, 1, 12, dtype=torch.bfloat16) for _ in range(3))
    for act, function in (("gelu", F.gelu), ("silu", F.silu), ("relu", F.relu)):
        got = torch.ops.trickle.linear_epilogue(x, w, bias[0, 0], act, 3, 9, -1, [a, b])
        out = F.linear(x, w, bias[0, 0])
        want = (torch.cat([out[..., :3], function(out[..., 3:9]), out[..., 9:]], dim=-1) + a) + b
        assert torch.equal(got, want)
        gated = torch.ops.trickle.linear_epilogue(x, w, bias[0, 0], act, 6, 10, 1, [a[..., :4]])
        assert torch.equal(gated, function(out[..., 6:10]) * out[..., 1:5] + a[..., :4])
