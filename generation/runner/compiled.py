"""--compile: the step's parts torch.compile may replace, each on its own; a part that fails to
compile, or a compiled step that fails to be captured, runs uncompiled."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator

import structlog
import torch

from trickle.generation.models import compile_regions, regional_layers, restore_layers
from trickle.generation.sampler import MODES, PLAIN, TOP_K, sample_rows

log = structlog.get_logger("generation.runner")


def brief(err: Exception) -> str:
    """Enough of an error to see what failed and why, not a compiler's whole generated source."""
    return f"{type(err).__name__}: {err}"[:4000]


class CompiledParts:
    """The decode forward, the layers' regions and the sampler of each mode, as the step runs them:
    plain until `compile` swaps in compiled ones."""

    def __init__(self, base: torch.nn.Module, decode_forward: Callable[[int, int], torch.Tensor]) -> None:
        self.base = base
        self.plain_decode = decode_forward
        self.decode_forward = decode_forward
        self.samplers: dict[str, Callable[..., torch.Tensor]] = dict.fromkeys(MODES, sample_rows)
        self.regional: list[torch.nn.Module] = []  # layers running compiled regions

    @property
    def any(self) -> bool:
        return (
            bool(self.regional)
            or self.decode_forward != self.plain_decode
            or any(sampler is not sample_rows for sampler in self.samplers.values())
        )

    def compile(
        self,
        device: torch.device,
        decode: Callable[[int, int], object],
        decode_shapes: Iterable[tuple[int, int]],
        prefill: Callable[[int, int], object],
        prefill_shapes: Iterable[tuple[int, int]],
        sample: Callable[[int, int], object],
        sample_batches: Iterable[int],
    ) -> None:
        """torch.compile the model and the sampler, compiling each by running it (`decode`, `prefill`,
        `sample` at the given shapes: the smallest and largest, so the ones between find a graph with
        those sizes symbolic). On the default stream, outside any capture.

        The model: layers its family can run as regions (Falcon multi-query) compile two tensor-only
        parts once for every layer, prefill too; any other model's whole decode forward compiles (one
        layer after another: minutes). The full-sort sampler stays uncompiled: inductor (torch 2.11)
        fails to generate its cumsum over a dynamic vocabulary, and the sort dominates it anyway."""
        self.regional = regional_layers(self.base)
        if self.regional:
            compile_regions(self.regional, torch.compile)
            with self._or_uncompiled(device, "the model's layers; they run uncompiled", self.undo_layers):
                for shape in decode_shapes:
                    decode(*shape)
                for shape in prefill_shapes:
                    prefill(*shape)
        else:
            self.decode_forward = torch.compile(self.plain_decode, dynamic=True)
            with self._or_uncompiled(device, "the decode forward; it runs uncompiled", self.undo_forward):
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
        self.undo_forward()
        self.samplers = dict.fromkeys(MODES, sample_rows)
        self.undo_layers()

    def undo_forward(self) -> None:
        self.decode_forward = self.plain_decode

    def undo_layers(self) -> None:
        restore_layers(self.regional)
        self.regional = []

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
