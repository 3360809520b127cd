"""The decoder layers' linear layers in a decode step of one row, on a GPU: a Triton matrix-vector
kernel. On the H200 it reads the Falcon-7B and Llama-7B layer matrices at 73-93% of the memory
bandwidth, where cuBLAS's kernels for one row read them at 59-87% (`bench/skinny_linear.py`,
`bench/results/h200-session20/`).

Each program of the kernel takes two whole rows of the weight (output features) and walks them along the
input features, multiplying by the input element by element into a float32 tile it sums once at the
end. Steps of several rows keep cuBLAS: a variant of the kernel for 2 to 64 rows (in the benchmark),
with one setting for every shape, tied it at 2-16 rows and lost at 32-64.

`linear` is one opaque operator (`torch.ops.trickle.linear`) that runs the kernel where it applies (CUDA,
one row, a contiguous weight of a float type) and `F.linear` everywhere else, deciding by the shapes it
is called with: a compiled layer traced once for every batch size takes it with no guard on the rows,
and a CUDA graph captures whichever it chose. `use_in_compiled(module)` has a module's linear layers
call it in compiled code (decode steps) and `F.linear` in eager code.

Linear layers that read one input are fused (`siblings`, `fuse`): one weight matrix for the group, the
members' weights views of its rows, so eager code computes what it did. Compiled, each member computes
the group's product with `linear` and takes its columns, and the backend `merging_repeats` keeps one
of those identical calls: one product reads the group's weights, nearer the bandwidth than several
smaller ones (`bench/gemm_shapes.py`).

In graphs of one row the backend also folds what follows a product into the kernel's epilogue
(`fuse_epilogues`, `linear_epilogue`): an activation, a gated MLP's `act(gate) * up`, residual
additions, each rounded as its own operator rounds it, so the step launches no kernel for them.
"""

from __future__ import annotations

import functools
import operator
import types
from collections.abc import Callable
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

# (BLOCK_N, BLOCK_K, warps, stages): within 5% of each shape's best setting in the sweep, 1.6% on average
CONFIG = (2, 1024, 4, 4)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs for input `x` and `weight` ([out, in])."""
    return (
        triton is not None
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and x.dtype in _FLOATS
        and weight.dim() == 2
        and weight.is_contiguous()
    )


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: tuple[int, int, int, int] = CONFIG,
    act: str = "",
    act_columns: tuple[int, int] = (0, 0),
    up_start: int = -1,
    addends: list[torch.Tensor] | tuple[torch.Tensor, ...] = (),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for one row `x` ([..., in], one row in all), by the kernel, and
    `linear_epilogue`'s epilogue where `act`, `up_start` or `addends` are given; into `out` if given
    (contiguous, of the result's shape and x's type)."""
    out_features, in_features = weight.shape
    if up_start >= 0:  # gated: one output a gate column
        out_features = act_columns[1] - act_columns[0]
    row = x.reshape(in_features)
    if row.stride(0) != 1:
        row = row.contiguous()
    if out is None:
        out = torch.empty(out_features, device=x.device, dtype=x.dtype)
    block_n, block_k, warps, stages = config
    first, second = (*(a.reshape(out_features) for a in addends), out, out)[:2]
    _matvec_kernel[(triton.cdiv(out_features, block_n),)](
        row,
        weight,
        bias if bias is not None else weight,
        out,
        first,
        second,
        out_features,
        in_features,
        *act_columns,
        up_start,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS.index(act) if act else 0,
        GATED=up_start >= 0,
        ADDS=len(addends),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out.view(*x.shape[:-1], out_features)


@torch.library.custom_op("trickle::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if applies(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


OPS = (torch.ops.trickle.linear, torch.ops.trickle.linear.default)
"""How the operator appears as a graph node's target."""

# What `linear_epilogue` may apply to a range of its columns, each computed in float32 from the product
# rounded to its type, as the activation's own operator computes it; the kernel takes its index in
# ACTIVATIONS (0: nothing)
_ACT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
ACTIVATIONS = ("", *_ACT_FUNCTIONS)
MOST_ADDENDS = 2


@torch.library.custom_op("trickle::linear_epilogue", mutates_args=())
def linear_epilogue(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    act_start: int,
    act_stop: int,
    up_start: int,
    addends: list[torch.Tensor],
    joins: bool = False,
) -> torch.Tensor:
    """`linear(x, weight, bias)`, then `act` over its columns act_start:act_stop, then each of `addends`
    added in turn: what those operators compute one after another (each result rounded to the output's
    type), in the kernel's epilogue where it applies, so a one-row step runs no kernel for them.

    Gated (`up_start` >= 0): the output is the activated columns times as many columns from up_start,
    element by element (a gated MLP's `act(gate) * up`), then the addends. `joins`: first wait for
    what `linear_aside` started (its product is one of the addends)."""
    if joins and x.is_cuda:
        torch.cuda.current_stream(x.device).wait_stream(_side_stream(x.device))
    if applies(x, weight) and all(a.dtype == x.dtype and a.is_contiguous() for a in addends):
        columns = (act_start, act_stop)
        return skinny_linear(
            x, weight, bias, act=act, act_columns=columns, up_start=up_start, addends=addends
        )
    out = F.linear(x, weight, bias)
    if up_start >= 0:
        gate = out[..., act_start:act_stop]
        out = _ACT_FUNCTIONS[act](gate) * out[..., up_start : up_start + gate.shape[-1]]
    elif act:
        head, part, tail = out[..., :act_start], out[..., act_start:act_stop], out[..., act_stop:]
        out = torch.cat([head, _ACT_FUNCTIONS[act](part), tail], dim=-1)
    for addend in addends:
        out = out + addend
    return out


EPILOGUE_OPS = (torch.ops.trickle.linear_epilogue, torch.ops.trickle.linear_epilogue.default)


@linear_epilogue.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    act_start: int,
    act_stop: int,
    up_start: int,
    addends: list[torch.Tensor],
    joins: bool = False,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], act_stop - act_start if up_start >= 0 else weight.shape[0])


@torch.library.custom_op("trickle::linear_aside", mutates_args=())
def linear_aside(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear(x, weight, bias)`, where the kernel applies started on a side stream, so that the small
    kernels queued after it (a parallel-attention layer's attention, that read little memory) run beside
    it rather than after it; a later `linear_epilogue(..., joins=True)` waits for it (`run_aside`).
    Elsewhere computed in place (on a GPU the side stream still forks, so that the join has a fork to
    wait for, as a CUDA graph's capture requires)."""
    if not x.is_cuda:
        return F.linear(x, weight, bias)
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    side.wait_stream(main)
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    out = torch.empty(*x.shape[:-1], weight.shape[0], device=x.device, dtype=x.dtype)
    with torch.cuda.stream(side):
        skinny_linear(x, weight, bias, out=out)
    # x's memory is not given to anything else until the side stream is done with it (the allocator
    # defers that free to the capture's end while a CUDA graph is being captured)
    x.record_stream(side)
    return out


@linear_aside.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


ASIDE_OPS = (torch.ops.trickle.linear_aside, torch.ops.trickle.linear_aside.default)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _plain(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear]:
    """A linear layer whose forward is `F.linear` on float weights: not quantized (other classes), not
    wrapped by accelerate's offloading hooks or anything else that replaced its forward."""
    ours = getattr(vars(module).get("forward"), "__func__", None) is _forward
    return (
        type(module) is torch.nn.Linear
        and module.weight.dtype in _FLOATS
        and not hasattr(module, "_hf_hook")
        and ("forward" not in vars(module) or ours)
    )


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        fused = getattr(module, "fused_weight", None)
        if fused is not None:
            # Every member of the group computes the group's product, and the compiled graph keeps one
            # (`merge_repeats`): each takes its own columns of it.
            out = torch.ops.trickle.linear(x, fused, module.fused_bias)
            return out[..., module.fused_start : module.fused_stop]
        return torch.ops.trickle.linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def use_in_compiled(module: torch.nn.Module) -> None:
    """Every plain `nn.Linear` in `module` calls `linear` when traced by torch.compile, `F.linear` when
    run eagerly (same arithmetic as before)."""
    for child in module.modules():
        if _plain(child):
            child.forward = types.MethodType(_forward, child)  # type: ignore[method-assign]


def restore(module: torch.nn.Module) -> None:
    """Undo `use_in_compiled`."""
    for child in module.modules():
        if _plain(child):
            child.__dict__.pop("forward", None)


def siblings(layers: list[torch.nn.Module], run: Callable[[], object]) -> list[list[torch.nn.Linear]]:
    """The plain linear layers of `layers` that `run()` (a forward of the model) feeds one input tensor:
    groups of two or more that can be fused, each in the order its members ran (a decoder layer's
    query, key and value projections; an MLP's gate and up projections; Falcon's query/key/value and
    MLP up projections, which its parallel attention feeds the same normed input)."""
    inputs: dict[torch.nn.Linear, torch.Tensor] = {}

    def record(module: torch.nn.Linear, args: tuple[object, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            inputs.setdefault(module, args[0])  # kept alive, so no two inputs are one object by chance

    handles = [
        child.register_forward_pre_hook(record)
        for layer in layers
        for child in layer.modules()
        if _plain(child)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[torch.nn.Linear]] = []
    for module, x in inputs.items():
        group = next((g for g in groups if inputs[g[0]] is x and _fusable(g[0], module)), None)
        if group is None:
            groups.append([module])
        else:
            group.append(module)
    return [group for group in groups if len(group) > 1]


def _fusable(a: torch.nn.Linear, b: torch.nn.Linear) -> bool:
    wa, wb = a.weight, b.weight
    return (
        wa.shape[1] == wb.shape[1]
        and wa.dtype == wb.dtype
        and wa.device == wb.device
        and (a.bias is None) == (b.bias is None)
    )


@torch.no_grad()
def fuse(group: list[torch.nn.Linear]) -> None:
    """One weight matrix (and bias) for the group, its members' own weights views of its rows: eager code
    computes what it did, and compiled code (`_forward`) computes the group's product once."""
    with torch.inference_mode(False):  # tensors that outlive the runner's inference-mode calls
        weight = torch.cat([m.weight.detach() for m in group])
        bias = torch.cat([m.bias.detach() for m in group]) if group[0].bias is not None else None
        start = 0
        for member in group:
            stop = start + member.out_features
            member.weight = torch.nn.Parameter(weight[start:stop], requires_grad=False)
            if bias is not None:
                member.bias = torch.nn.Parameter(bias[start:stop], requires_grad=False)
            member.register_buffer("fused_weight", weight, persistent=False)
            member.register_buffer("fused_bias", bias, persistent=False)
            vars(member).update(fused_start=start, fused_stop=stop)  # plain attributes: ints, not tensors
            start = stop


def merge_repeats(graph: torch.fx.Graph) -> int:
    """Keep one of the `trickle::linear` calls of `graph` that take the same arguments (a fused group's
    members): the others' users take its result. Returns how many were removed."""
    kept: dict[tuple[object, ...], torch.fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in OPS:
            continue
        key = (*node.args, *sorted(node.kwargs.items()))
        if key in kept:
            node.replace_all_uses_with(kept[key])
            graph.erase_node(node)
            removed += 1
        else:
            kept[key] = node
    return removed


_ADDS = (operator.add, operator.iadd, torch.add)
_ACT_TARGETS = {
    torch._C._nn.gelu: "gelu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.relu: "relu",
    torch.relu: "relu",
}


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _one_row(node: torch.fx.Node) -> bool:
    """Whether a linear call's input is one row, with no symbolic size (a graph traced for batch 1)."""
    x = _value(node.args[0])
    return x is not None and all(type(d) is int for d in x.shape) and x.numel() == x.shape[-1]


def _activation(node: torch.fx.Node) -> str:
    """The name in ACTIVATIONS of the activation `node` applies to its one input, or ""."""
    name = _ACT_TARGETS.get(node.target, "") if node.op == "call_function" else ""  # type: ignore[arg-type]
    extra = dict(node.kwargs)
    if name == "gelu" and extra.pop("approximate", "none") != "none":
        return ""
    if name in ("silu", "relu") and extra.pop("inplace", False):
        return ""
    return name if len(node.args) == 1 and not extra else ""


def _columns(node: torch.fx.Node, width: int) -> tuple[int, int] | None:
    """The columns [start, stop) that `node` takes of its input's last dimension, if it is such a slice."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis):
        return None
    part = index[1]
    if not isinstance(part, slice) or part.step not in (None, 1):
        return None
    if not all(isinstance(end, int | None) for end in (part.start, part.stop)):
        return None
    start, stop, _ = part.indices(width)
    return start, stop


def _is_identity(node: torch.fx.Node) -> bool:
    """Dropout that does nothing: not training, or p = 0 (given by name or in place)."""
    if node.op != "call_function" or node.target is not F.dropout or not 1 <= len(node.args) <= 4:
        return False
    given = dict(zip(("p", "training", "inplace"), node.args[1:], strict=False))
    if given.keys() & node.kwargs.keys():
        return False
    given.update(node.kwargs)
    p, training, inplace = given.get("p", 0.5), given.get("training", True), given.get("inplace", False)
    return inplace is False and (training is False or (isinstance(p, float) and p == 0.0))


def fuse_epilogues(graph: torch.fx.Graph) -> int:
    """In a graph traced for one row, fold into `trickle::linear` calls what follows them (each call's
    kernel then computes it, in one launch; `linear_epilogue`):
    - a gated MLP's `act(gate) * up`, gate and up two slices of one fused product (Llama's gate and up
      projections), its only users;
    - or an activation of one column range of a product (Falcon's MLP up projection, fused with its
      query/key/value), where every other use of the product is a slice of other columns, or of the
      whole product where that is its only use (OPT's unfused up projection);
    - then up to MOST_ADDENDS tensors added to the result, one after another (residual connections;
      Falcon's attention output added to its MLP's), through dropouts that do nothing.
    Graphs of a symbolic batch are left as they are (torch's kernels take several rows). Returns how many
    calls were rewritten."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in OPS or not _one_row(node):
            continue
        product = _value(node)
        if product is None:
            continue
        x, weight, bias = node.args
        width = product.shape[-1]
        act, columns, up_start = "", (0, 0), -1
        last, done = node, [node]
        gated = _gated(node, width)
        activated = None if gated else _activated_slice(node, width)
        if gated is not None:
            mul, act_node, slices, columns, up_start = gated
            act = _activation(act_node)
            last, done = mul, [node, *slices, act_node, mul]
        elif activated is not None:
            sliced, act_node, columns = activated
            act = _activation(act_node)
            act_node.replace_all_uses_with(sliced)
            graph.erase_node(act_node)
        result = _value(last)
        chain, addends = _added(last, result) if result is not None else ([], [])
        if not (act or addends):
            continue
        if chain:
            last, done = chain[-1], [*done, *chain]
        args = (x, weight, bias, act, *columns, up_start, addends)
        with graph.inserting_before(last):
            fused = graph.call_function(torch.ops.trickle.linear_epilogue.default, args)
        fused.meta.update(last.meta)
        last.replace_all_uses_with(fused)
        for old in reversed(done):
            graph.erase_node(old)
        rewritten += 1
    return rewritten


def _gated(
    node: torch.fx.Node, width: int
) -> tuple[torch.fx.Node, torch.fx.Node, list[torch.fx.Node], tuple[int, int], int] | None:
    """Where a product's users are two slices of one width, `gate` and `up`, and the product's only use is
    `act(gate) * up`: the multiplication, the activation, both slices, the gate's columns and the first
    of up's."""
    users = list(node.users)
    if len(users) != 2 or any(_columns(user, width) is None for user in users):
        return None
    for gate, up in (users, users[::-1]):
        act = next(iter(gate.users)) if len(gate.users) == 1 else None
        if act is None or not _activation(act) or len(act.users) != 1 or len(up.users) != 1:
            continue
        mul = next(iter(act.users))
        a, b = _columns(gate, width), _columns(up, width)
        if a is None or b is None:
            continue
        if (
            mul is next(iter(up.users))
            and mul.op == "call_function"
            and mul.target in (operator.mul, torch.mul)
            and not mul.kwargs
            and len(mul.args) == 2
            and set(mul.args) == {act, up}
            and a[1] - a[0] == b[1] - b[0]
        ):
            return mul, act, [gate, up], a, b[0]
    return None


def _activated_slice(
    node: torch.fx.Node, width: int
) -> tuple[torch.fx.Node, torch.fx.Node, tuple[int, int]] | None:
    """Where every user of a product slices its last dimension and one slice, of columns no other slice
    takes, goes only to an activation: that slice, the activation and its columns. Where the product's
    only user is an activation (an MLP's unfused up projection): the product, the activation, all
    columns."""
    if len(node.users) == 1 and _activation(act := next(iter(node.users))):
        return node, act, (0, width)
    slices = {user: _columns(user, width) for user in node.users}
    if not slices or any(columns is None for columns in slices.values()):
        return None
    found = [
        (user, act) for user in slices if len(user.users) == 1 and _activation(act := next(iter(user.users)))
    ]
    if len(found) != 1:
        return None
    sliced, act = found[0]
    start, stop = slices[sliced]  # type: ignore[misc]
    for user, columns in slices.items():
        if user is not sliced and columns[0] < stop and start < columns[1]:  # type: ignore[index]
            return None
    return sliced, act, (start, stop)


def _added(node: torch.fx.Node, product: torch.Tensor) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The nodes after a product that add tensors of its shape, type and layout to it one after another
    (with the dropouts that do nothing between them), each the only user of the one before, up to the
    last addition; and those tensors, at most MOST_ADDENDS."""
    chain: list[torch.fx.Node] = []
    addends: list[torch.fx.Node] = []
    current, added = node, 0
    while len(current.users) == 1 and len(addends) < MOST_ADDENDS:
        user = next(iter(current.users))
        if not _is_identity(user):
            if user.op != "call_function" or user.target not in _ADDS or len(user.args) != 2 or user.kwargs:
                break
            left, right = user.args
            other = right if left is current else left
            value = _value(other)
            if (
                other is current
                or (user.target is operator.iadd and left is not current)  # it writes into `other`
                or value is None
                or value.shape != product.shape
                or value.dtype != product.dtype
                or not value.is_contiguous()
            ):
                break
            addends.append(other)  # type: ignore[arg-type]
            added = len(chain) + 1
        chain.append(user)
        current = user
    return chain[:added], addends


def run_aside(graph: torch.fx.Graph) -> int:
    """After `fuse_epilogues`, in a graph of one row: where a product P (through dropouts that do
    nothing) is the first addend of another product E's epilogue, and neither product's input depends on
    the other (a parallel-attention layer: the attention's output projection and the MLP's down
    projection, both added to the residual), the product whose input is ready sooner runs beside what
    comes between it and the other (`linear_aside`: started as soon as its input is ready, the nodes
    that input needs moved up to their own inputs), and the other's kernel waits for it and adds it
    first of its addends (`linear_epilogue(..., joins=True)`). Exact: P aside, E's epilogue is
    unchanged; E aside (Falcon's: E the down projection), P's kernel computes round(round(p) + e), which
    is E's round(e + round(p)), as additions commute; the further addends follow in their order. Returns
    how many were rewritten."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in EPILOGUE_OPS:
            continue
        x, weight, bias, act, _, _, up_start, addends, *joins = node.args
        if act or up_start >= 0 or joins or not addends:
            continue
        first = addends[0]
        through = []  # dropouts that do nothing between P and E
        while isinstance(first, torch.fx.Node) and _is_identity(first) and len(first.users) == 1:
            through.append(first)
            first = first.args[0]
        source = first.args[0] if isinstance(first, torch.fx.Node) and first.args else None
        if not (
            isinstance(first, torch.fx.Node)
            and isinstance(source, torch.fx.Node)
            and first.op == "call_function"
            and first.target in OPS
            and len(first.users) == 1
            and _one_row(first)
        ):
            continue
        needs_e, needs_p = _ancestors(x), _ancestors(source)
        if first in needs_e or node in needs_p:
            continue
        rest = list(addends[1:])
        aside_args: tuple[Any, ...]
        joined_args: tuple[Any, ...]
        if len(needs_p) < len(needs_e):  # P's input is ready sooner: P aside
            aside_args, joined_args, ready = first.args, (x, weight, bias), _hoisted(graph, source, needs_p)
        else:  # E aside, P's kernel adds it
            aside_args, joined_args, ready = (x, weight, bias), first.args, _hoisted(graph, x, needs_e)
        with graph.inserting_after(ready):
            aside = graph.call_function(torch.ops.trickle.linear_aside.default, aside_args)
        aside.meta["example_value"] = _value(first)
        with graph.inserting_before(node):
            joined = graph.call_function(
                torch.ops.trickle.linear_epilogue.default, (*joined_args, "", 0, 0, -1, [aside, *rest], True)
            )
        joined.meta.update(node.meta)
        node.replace_all_uses_with(joined)
        for old in (node, *through, first):
            graph.erase_node(old)
        rewritten += 1
    return rewritten


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """`node` and every node it reads, directly or through others."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return seen


def _mutates(node: torch.fx.Node) -> bool:
    """Whether `node` may write into a tensor it is given (an in-place operator or method) or otherwise
    depends on its place (a dropout that draws, a grad-mode switch), so that nothing moves across it."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op != "call_function":
        return node.op not in ("placeholder", "get_attr", "output")
    name = getattr(node.target, "__name__", "")
    schema = getattr(node.target, "_schema", None)
    return (
        node.kwargs.get("inplace") is True
        or (node.target is F.dropout and not _is_identity(node))  # draws random numbers in order
        or name.startswith("_set")  # dynamo's grad-mode switches and the like
        or (name.startswith("i") and getattr(operator, name, None) is node.target)  # operator.iadd, ...
        or node.target is operator.setitem
        or (schema is not None and schema.is_mutable)
    )


def _hoisted(graph: torch.fx.Graph, node: torch.fx.Node, needed: set[torch.fx.Node]) -> torch.fx.Node:
    """The node after which what reads `node` can go soonest: `node` itself, after moving it and the
    nodes it needs (`needed`, its `_ancestors`) each up to just after its latest input (they were traced
    where the program took them, maybe well after their inputs were ready), never above a node that
    may write into a tensor (`_mutates`); the last placeholder where `node` is one."""
    if node.op == "placeholder":
        return [n for n in graph.nodes if n.op == "placeholder"][-1]
    barrier: torch.fx.Node | None = None  # the last node that writes, among those seen so far
    for current in list(graph.nodes):
        if current.op == "placeholder":
            barrier = current
            continue
        if current in needed and current.op == "call_function" and not _mutates(current):
            order = {n: i for i, n in enumerate(graph.nodes)}
            latest = max([*current.all_input_nodes, barrier], key=lambda n: -1 if n is None else order[n])
            if latest is not None and order[latest] < order[current] - 1:
                latest.append(current)
        if _mutates(current):
            barrier = current
        if current is node:
            break
    return node


def merging_repeats(backend: str | Callable[..., Any]) -> Callable[..., Any]:
    """A torch.compile backend: `merge_repeats`, `fuse_epilogues` and `run_aside` on each graph dynamo
    captures, then `backend` (a backend's name, such as "inductor", looked up only when a graph
    compiles)."""

    def compile_graph(module: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        changed = merge_repeats(module.graph) + fuse_epilogues(module.graph)
        aside = run_aside(module.graph)
        if changed + aside:
            module.recompile()
        inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        if not aside:
            return inner(module, example_inputs)
        # inductor moves each operator to just before its first user (for locality), which would start
        # the products run aside only when their result is needed: keep the graph's order
        from torch._inductor import config

        with config.patch(reorder_for_locality=False):
            return inner(module, example_inputs)

    return compile_graph


if triton is not None:

    @triton.jit
    def _matvec_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        first_ptr,
        second_ptr,
        N,
        K,
        act_start,
        act_stop,
        up_start,
        HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr,
        GATED: tl.constexpr,
        ADDS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # y[n] = sum_k x[k] w[n, k] (+ b[n]) for this program's BLOCK_N output features n, then the
        # epilogue (`linear_epilogue`), each result rounded to y's type as separate operators round it.
        # Gated, output n is act(product[act_start + n]) * product[up_start + n].
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        rows = cols
        if GATED:
            rows = act_start + cols
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        up_rows = w_ptr + (up_start + cols).to(tl.int64)[:, None] * K
        wide = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        wide_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0.0)
            if GATED:
                u = tl.load(up_rows + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            wide += w.to(tl.float32) * x.to(tl.float32)[None, :]
            if GATED:
                wide_up += u.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(wide, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=col_ok, other=0.0).to(tl.float32)
        out_type = y_ptr.dtype.element_ty
        if ACT != 0:
            v = acc.to(out_type).to(tl.float32)
            if ACT == 1:  # gelu, as torch computes it (erf)
                v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
            elif ACT == 2:  # silu
                v = v / (1.0 + tl.exp(-v))
            else:  # relu
                v = tl.maximum(v, 0.0)
            acc = v if GATED else tl.where((cols >= act_start) & (cols < act_stop), v, acc)
        if GATED:
            up = tl.sum(wide_up, axis=1)
            if HAS_BIAS:
                up += tl.load(b_ptr + up_start + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = acc.to(out_type).to(tl.float32) * up.to(out_type).to(tl.float32)
        if ADDS >= 1:
            acc = acc.to(out_type).to(tl.float32) + tl.load(first_ptr + cols, mask=col_ok).to(tl.float32)
        if ADDS >= 2:
            acc = acc.to(out_type).to(tl.float32) + tl.load(second_ptr + cols, mask=col_ok).to(tl.float32)
        tl.store(y_ptr + cols, acc.to(out_type), mask=col_ok)
