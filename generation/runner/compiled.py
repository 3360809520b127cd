"""torch.compile (on by default where the step runs in CUDA graphs): the step's parts it may replace,
each on its own; a part that fails to compile, or a compiled step that fails to be captured, runs
uncompiled.

The model compiles as regions: one compiled function per decoder-layer class, shared by all its layers
(a layer's weights are inputs, not constants, and nothing it reads names the layer), which runs in
paged decode steps. Its
attention is one opaque operator (`generation.kv.attention.decode_layer`), so each layer is one graph:
inductor fuses what runs between the weight GEMMs (norms, rotary, activations, residual adds). Compiling
one layer instead of the whole model keeps start-up short, and inductor's on-disk caches
(`cache_dir`) make a second start shorter still."""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog
import torch

from trickle.generation import linear
from trickle.generation.kv.attention import context
from trickle.generation.models import decoder_layers
from trickle.generation.sampler import MODES, PLAIN, TOP_K, sample_rows

log = structlog.get_logger("generation.runner")


def cache_dir() -> Path:
    """Where inductor keeps what it compiled, across starts: $TORCHINDUCTOR_CACHE_DIR where set, else
    $XDG_CACHE_HOME/trickle/torchinductor (default ~/.cache), set for this process here."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "trickle" / "torchinductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


# The longest row a reduction over one row keeps whole in one program (`one_row_persistent`)
PERSISTENT_MOST = 16384


def one_row_persistent() -> Any:
    """inductor's choices, but a reduction of one row of at most PERSISTENT_MOST values (a one-row step's
    norms) keeps its row in one program's registers (a persistent reduction) where inductor would walk a
    row of more than 1,024 twice: Falcon-7B's layer norm 1.93 us a layer rather than 2.59, Llama-7B's RMS
    norm 1.51 rather than 1.65 (`bench/one_row_norms.py`, h200-session23)."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class OneRowPersistent(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            sizes = V.graph.sizevars
            if sizes.statically_known_equals(features.numel, 1) and sizes.statically_known_leq(
                features.reduction_numel, PERSISTENT_MOST
            ):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return OneRowPersistent()


def _inductor_one_row_persistent(module: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
    """inductor, with `one_row_persistent`'s choices."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.virtualized import V

    with V.set_choices_handler(one_row_persistent()):
        return compile_fx(module, inputs)


def compile_layers(layers: list[torch.nn.Module], compile: Callable[..., Any]) -> None:
    """Each layer runs `compile(type(layer).forward)` in paged decode steps (one compiled function per
    layer class) and its own forward otherwise. Compiled, its linear layers go through
    `generation.linear` (one-row steps read their weights with its kernel)."""
    # Nothing a layer's traced code reads names the layer: the cache's `update` leaves its index alone in
    # a paged decode step, and `decode_layer` takes none.
    dynamo = torch._dynamo.config
    # A few graphs a class: batch 1 and more, and layers of a model with several kinds (sliding window
    # or not).
    dynamo.recompile_limit = max(dynamo.recompile_limit, 32)
    compiled: dict[type, Callable[..., Any]] = {}
    for layer in layers:
        cls = type(layer)
        if cls not in compiled:
            compiled[cls] = compile(cls.forward)
        forward = functools.partial(_layer_forward, compiled=compiled[cls], plain=cls.forward)
        layer.forward = types.MethodType(forward, layer)
        linear.use_in_compiled(layer)


def _layer_forward(
    layer: torch.nn.Module, *args: Any, compiled: Callable[..., Any], plain: Callable[..., Any], **kwargs: Any
) -> Any:
    run = compiled if context.decode is not None else plain
    return run(layer, *args, **kwargs)


def restore_layers(layers: list[torch.nn.Module]) -> None:
    """Undo `compile_layers`: the layers run their class's forward again."""
    for layer in layers:
        layer.__dict__.pop("forward", None)
        linear.restore(layer)


def brief(err: Exception) -> str:
    """Enough of an error to see what failed and why, not a compiler's whole generated source."""
    return f"{type(err).__name__}: {err}"[:4000]


class CompiledParts:
    """The model's decoder layers and the sampler of each mode, as the step runs them: plain until
    `compile` swaps in compiled ones."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.samplers: dict[str, Callable[..., torch.Tensor]] = dict.fromkeys(MODES, sample_rows)
        self.layers: list[torch.nn.Module] = []  # layers running compiled in decode steps

    @property
    def any(self) -> bool:
        return bool(self.layers) or any(sampler is not sample_rows for sampler in self.samplers.values())

    def compile(
        self,
        device: torch.device,
        decode: Callable[[int, int], object] | None,
        decode_shapes: Iterable[tuple[int, int]],
        sample: Callable[[int, int], object],
        sample_batches: Iterable[int],
    ) -> None:
        """torch.compile the decoder layers and the sampler, compiling each by running it (`decode` and
        `sample` at the given shapes: the smallest and largest, so the ones between find a graph with
        those sizes symbolic). On the default stream, outside any capture. `decode` None: decode steps
        do not run the paged operator (the model's attention does not come through transformers'
        interface), so its layers stay uncompiled.

        Linear layers fused before (`ModelRunner`, `generation.linear.fuse`) have each group's product
        computed once: the backend merges the repeats (`linear.merging_repeats`).

        The full-sort sampler stays uncompiled: inductor (torch 2.11) fails to generate its cumsum over
        a dynamic vocabulary, and the sort dominates it anyway."""
        layers = decoder_layers(self.base)
        if decode is None or not layers:
            why = "its decode steps do not take the paged kernel" if layers else "no decoder layers found"
            log.info("the model's layers run uncompiled", why=why)
        else:
            backend = linear.merging_repeats(_inductor_one_row_persistent)
            compile_layers(layers, functools.partial(torch.compile, backend=backend))
            self.layers = layers
            with self._or_uncompiled(device, "the model's layers; they run uncompiled", self.undo_layers):
                for shape in decode_shapes:
                    decode(*shape)
        compiled = torch.compile(sample_rows, dynamic=True)
        for mode in (PLAIN, TOP_K):
            self.samplers[mode] = compiled
            undo = functools.partial(self.samplers.__setitem__, mode, sample_rows)
            with self._or_uncompiled(device, "a sampler; it runs uncompiled", undo, mode=mode):
                for batch in sample_batches:
                    sample(batch, MODES.index(mode))

    def undo(self) -> None:
        """Everything runs uncompiled again."""
        self.samplers = dict.fromkeys(MODES, sample_rows)
        self.undo_layers()

    def undo_layers(self) -> None:
        restore_layers(self.layers)
        self.layers = []

    @staticmethod
    @contextlib.contextmanager
    def _or_uncompiled(
        device: torch.device, what: str, undo: Callable[[], None], **context: str
    ) -> Iterator[None]:
        """Around a freshly compiled part's warm-up runs (which compile it): if they fail, log why and
        `undo`, so the part runs uncompiled, and go on."""
        try:
            yield
            torch.cuda.synchronize(device)
        except Exception as err:
            log.warning(f"torch.compile failed on {what}", error=brief(err), **context)
            undo()
