"""ModelRunner: prefill, batched decode (CUDA graphs on a GPU) over the paged KV cache, and sampling;
the only code that runs on the device."""

from __future__ import annotations

import bisect
import contextlib
import functools
import inspect
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from transformers import PreTrainedModel

from trickle.generation.engine_config import EngineConfig
from trickle.generation.head import ModelHead
from trickle.generation.kv import attention as paged_attention
from trickle.generation.kv.blocks import NULL_BLOCK
from trickle.generation.kv.cache import PagedKVCache, PassThroughCache
from trickle.generation.masks import AttentionMasks, Mask, UnsupportedModelError, alibi_from_4d
from trickle.generation.models import adapt, compile_regions, regional_layers, restore_layers
from trickle.generation.sampler import FULL, MODES, PLAIN, TOP_K, SamplingTensors, sample_rows, sampling_mode
from trickle.generation.scheduler import ScheduledBatch
from trickle.generation.sequence import Sequence

log = structlog.get_logger("generation.runner")

# Attention reads the cache up to one of these lengths (capped at max_seq_len), so the decode step
# has few distinct shapes: one CUDA graph per (batch bucket, length bucket).
KV_LEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)
# A step's newcomers are prefilled as [rows, width], padded up to these buckets: one CUDA graph for each
# pair whose padded size fits the step's prefill token limit, an eager forward past it.
PREFILL_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_WIDTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# On the CPU, by default, the KV pool takes at most this share of the memory available.
CPU_KV_SHARE = 0.25
# A prefill step's newcomers, times the longest one's positions (its cached prefix included), at most
# this many times the prefill token budget: what it gathers to attend to the cached blocks is bounded.
PREFILL_READ_FACTOR = 16


def _cache_argument(module: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.x; pass whichever this version takes.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _bucket(value: int, buckets: tuple[int, ...], cap: int) -> int:
    index = bisect.bisect_left(buckets, value)
    return min(buckets[index] if index < len(buckets) else cap, cap)


class ModelRunError(RuntimeError):
    """The model cannot run in the engine (found by the forward `warm_up` runs first)."""


@dataclass
class Launched:
    """A step queued on the device: its rows, how many of them decoded, and where its tokens land."""

    rows: list[Sequence]
    num_decode: int
    tokens: torch.Tensor
    done: torch.cuda.Event | None  # recorded after the copy to `tokens`; None where the step ran inline


class ModelRunner:
    """Runs one engine step: moves rows, decodes the running rows, prefills newcomers (past the leading
    blocks the prefix cache holds for them), samples every row, and copies the new tokens back to the
    host with one device-to-host copy. `launch` queues a step and `collect` waits for it, so the engine
    prepares the next step while this one runs."""

    def __init__(self, model: PreTrainedModel, config: EngineConfig, eos_ids: set[int]) -> None:
        adapt(model)
        self.config = config
        self.device = next(model.parameters()).device
        if paged_attention.available(self.device):
            # Decode attention that reads the blocks in place, for models that take it (`check_forward`).
            paged_attention.install(model)
        self.dtype = model.dtype
        self.base = model.base_model
        self.head = ModelHead(model)
        self.vocab_size, self.hidden_size = model.get_output_embeddings().weight.shape
        self._cache_arg = _cache_argument(self.base)
        try:
            self.masks = AttentionMasks(model.config, self.dtype)
        except UnsupportedModelError as err:
            raise ModelRunError(str(err)) from err
        model_code = inspect.getmodule(type(self.base))
        if model_code is not None and hasattr(model_code, "build_alibi_tensor"):
            alibi_from_4d(model_code)
        # A step prefills at most the token budget, or one prompt of up to max_seq_len past it, and reads
        # (newcomers x the longest one's positions, cached ones included) at most the read budget.
        self.max_prefill_tokens = max(config.prefill_token_budget, config.max_seq_len)
        self.prefill_read_budget = max(PREFILL_READ_FACTOR * config.prefill_token_budget, config.max_seq_len)
        self.kernel_reads = False
        self.max_rows = config.max_batch_size
        self.spare_row = self.max_rows  # the per-row tables' extra row: padding rows read and write it
        self.block_size = config.kv_block_size
        self.num_blocks = self._plan_blocks()
        self.table_width = -(-config.max_seq_len // self.block_size)
        self.cache = PagedKVCache(
            self.num_blocks, self.block_size, self.max_rows + 1, self.table_width, self.device
        )
        self._tables = _BlockTables(self.cache.tables)
        self._prefill_shapes = self._graph_prefill_shapes()
        self._static = _StaticInputs(self.max_rows + 1, config.max_seq_len, self.device)
        # The previous step's sampled tokens, in its row order: the next step's inputs for its rows.
        self._last_tokens = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        # The decode forward's last hidden states, where the step's sampling (its own graph) reads them.
        self._hidden = torch.zeros(self.max_rows, self.hidden_size, dtype=self.dtype, device=self.device)
        # seen[row, token]: the token is in the row's prompt or output (for the repetition penalty); the
        # spare row takes what padding rows write
        self.seen = torch.zeros(self.max_rows + 1, self.vocab_size, dtype=torch.bool, device=self.device)
        self._prefill_in = _PrefillInputs(self.max_prefill_tokens, self.max_rows, self.spare_row, self.device)
        self.eos_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.eos_mask[[i for i in eos_ids if i < self.vocab_size]] = True
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._graphs: dict[tuple[str | int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool: Any = None  # one memory pool shared by every captured graph
        # bitsandbytes kernels sync with the host inside their forward: they run eagerly.
        quantized = getattr(model, "is_quantized", False)
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda" and not quantized
        # The decode forward and the sampler of each mode; `warm_up` swaps in compiled ones with --compile.
        self._decode_forward = self._decode_hidden
        self._samplers: dict[str, Callable[..., torch.Tensor]] = dict.fromkeys(MODES, sample_rows)
        self._regional: list[torch.nn.Module] = []  # layers running compiled regions (--compile)

    # ------------------------------------------------------------ planning

    def _plan_blocks(self) -> int:
        """Blocks in the KV pool (the null block included): as many as the settings say, or as the
        device's memory leaves room for; at least one request of max_seq_len must fit."""
        config = self.config
        if config.kv_cache_tokens is not None:
            tokens = config.kv_cache_tokens
            per_token = 0
        elif self.device.type == "cuda":
            per_token, activations = self._profile()
            total = torch.cuda.get_device_properties(self.device).total_memory
            allowed = total * config.memory_utilization * _memory_cap(self.device)
            free = allowed - torch.cuda.memory_allocated(self.device) - activations
            tokens = max(0, int(free // per_token))
        else:
            per_token = self._kv_bytes_per_token()
            tokens = self.max_rows * config.max_seq_len
            available = _available_memory()
            if available is not None and per_token:
                tokens = min(tokens, int(available * CPU_KV_SHARE // per_token))
        blocks = tokens // self.block_size
        if blocks * self.block_size < config.max_seq_len:
            raise MemoryError(
                f"the KV cache holds {blocks * self.block_size} positions, fewer than one request of"
                f" max_seq_len ({config.max_seq_len}); lower max_seq_len"
                + (" or raise gpu_memory_utilization" if config.kv_cache_tokens is None else "")
            )
        log.info(
            "kv cache planned",
            tokens=blocks * self.block_size,
            blocks=blocks,
            block_size=self.block_size,
            gib=round(blocks * self.block_size * per_token / 2**30, 2) if per_token else None,
            rows_at_max_seq_len=blocks * self.block_size // config.max_seq_len,
        )
        return blocks + 1  # and the null block

    @torch.inference_mode()
    def _kv_bytes_per_token(self) -> int:
        cache = PassThroughCache()
        self._trial_prefill(1, 2, cache)
        return cache.bytes_per_token

    @torch.inference_mode()
    def _profile(self) -> tuple[int, int]:
        """KV bytes per token, and the peak activation memory of the largest prefill a step may run."""
        # The step's most prompt tokens, in rows no longer than a request may be (a model's positions end
        # there: gpt2's table has 1,024).
        width = min(self.max_prefill_tokens, self.config.max_seq_len)
        rows = -(-self.max_prefill_tokens // width)
        cache = PassThroughCache()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._trial_prefill(rows, width, cache)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        # Sampling may sort the whole vocabulary for every row, with a few float32 and int64 tensors of
        # that size alive at once; leave room for that too. A prefill past a cached prefix gathers the
        # keys and values it reads, one layer at a time, and so does a decode step the kernel does not
        # read.
        activations += 48 * self.config.max_batch_size * self.vocab_size
        layers = getattr(self.base.config, "num_hidden_layers", None) or 1
        gathered = self.prefill_read_budget
        if not self.kernel_reads:
            gathered = max(gathered, self.max_rows * self.config.max_seq_len)
        activations += 2 * gathered * cache.bytes_per_token // layers
        return cache.bytes_per_token, activations

    # ------------------------------------------------------------ the step

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> Launched:
        """Queue the batch's step on the device and return at once; `collect` waits for its tokens.

        A row whose previous token is still in flight (`seq.in_flight`) is fed that token on the device,
        from the previous step's output, so the host never waits between two steps.
        """
        for src, dst in batch.moves:
            self.seen[dst] = self.seen[src]
        self._tables.update(batch)
        # One pair of host-to-device copies carries every row's inputs and sampling parameters.
        self._static.load(batch.rows)
        tokens = [self._decode(batch.decode)] if batch.decode else []
        if batch.prefill:
            tokens.append(self._prefill(batch.prefill))
        out = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
        self._last_tokens[: out.shape[0]].copy_(out)
        if self.device.type != "cuda":
            return Launched(batch.rows, len(batch.decode), out, None)
        host = self._static.host_tokens()[: out.shape[0]]
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Launched(batch.rows, len(batch.decode), host, done)

    @staticmethod
    def collect(launched: Launched) -> list[int]:
        """The step's sampled tokens, one per row in `launched.rows` order."""
        if launched.done is not None:
            launched.done.synchronize()  # waits with the GIL released: the event loop keeps serving
        return launched.tokens.tolist()

    def step(self, batch: ScheduledBatch) -> list[int]:
        """Launch and collect one step."""
        return self.collect(self.launch(batch))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Mask, cache: object) -> torch.Tensor:
        out = self.base(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return out.last_hidden_state

    def _causal_mask(self, lengths: torch.Tensor, width: int) -> Mask:
        # [n, 1, width, width] per layer kind: rows from position 0, keys past each row's length hidden
        keys = torch.arange(width, device=self.device)
        return self.masks.for_queries(keys[None].expand(lengths.shape[0], -1), keys, lengths)

    def _prefill_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """The padded [rows, width] that `rows` newcomers, the longest of `longest` tokens, prefill as."""
        return (
            _bucket(rows, PREFILL_ROW_BUCKETS, self.max_rows),
            _bucket(longest, PREFILL_WIDTH_BUCKETS, self.config.max_seq_len),
        )

    def _prefill(self, rows: list[Sequence]) -> torch.Tensor:
        """Prefill and sample the newcomers; returns their first tokens, [len(rows)].

        Newcomers with no cached prefix prefill from position 0 (captured per padded shape); where any
        has one, they prefill eagerly from their own first uncached position, attending to the cached
        blocks too."""
        self._mark_seen(rows)
        n, width = len(rows), max(seq.num_tokens - seq.num_cached for seq in rows)
        if any(seq.num_cached for seq in rows):
            self._prefill_in.load(rows, n, width)
            return self._prefill_static(n, width, max(seq.num_tokens for seq in rows))
        shape = self._prefill_shape(n, width)
        if not self.use_graphs or shape not in self._prefill_shapes:
            self._prefill_in.load(rows, n, width)
            return self._prefill_static(n, width)
        graph, tokens = self._graph("prefill", *shape)
        self._prefill_in.load(rows, *shape)
        graph.replay()
        return tokens[:n]

    def _mark_seen(self, rows: list[Sequence]) -> None:
        """The newcomers' rows of `seen` say exactly which tokens they hold (the prompt counts for the
        repetition penalty, and a resumed row's output too)."""
        index = torch.tensor([seq.slot for seq in rows])
        self.seen.index_fill_(0, index.to(self.device, non_blocking=True), False)
        tokens = [seq.tokens for seq in rows]
        where = torch.tensor([seq.slot for seq, held in zip(rows, tokens, strict=True) for _ in held])
        what = torch.tensor([token for held in tokens for token in held])
        self.seen.index_put_((where.to(self.device), what.to(self.device)), self._true)

    def _graph_prefill_shapes(self) -> list[tuple[int, int]]:
        """The padded [rows, width] shapes that get a CUDA graph."""
        rows = sorted({_bucket(b, PREFILL_ROW_BUCKETS, self.max_rows) for b in PREFILL_ROW_BUCKETS})
        widths = sorted(
            {_bucket(b, PREFILL_WIDTH_BUCKETS, self.config.max_seq_len) for b in PREFILL_WIDTH_BUCKETS}
        )
        return [(n, w) for n in rows for w in widths if n * w <= self.max_prefill_tokens]

    def _prefill_static(self, n: int, width: int, read_len: int | None = None) -> torch.Tensor:
        """Prefill [n, width] from the static buffers only, so it can be captured (`read_len` None: every
        row from position 0, attending to its new keys alone; else from its first uncached position,
        attending to its positions 0..read_len-1).

        Short rows are padded with their first token and padding rows repeat the first newcomer; what
        padding writes goes to the null block, and padding rows sample into the spare row."""
        inputs = self._prefill_in
        ids = inputs.ids[: n * width].view(n, width)
        lengths, rows, cached = inputs.rows[:n].unbind(1)
        offsets = self._static.key_index[:width][None]
        positions = cached[:, None] + offsets
        self.cache.for_forward(rows, positions, offsets < lengths[:, None], read_len)
        if read_len is None:
            mask = self._causal_mask(lengths, width)
        else:
            mask = self.masks.for_queries(positions, self._static.key_index[:read_len], cached + lengths)
        hidden = self._forward(ids, positions, mask, self.cache)
        last = hidden[self._static.rows[:n], lengths - 1]
        return self._sample(self.head(last), self._static.sampling_rows(rows), rows)

    def _sample(
        self, logits: torch.Tensor, params: SamplingTensors, rows: torch.Tensor, mode: str = FULL
    ) -> torch.Tensor:
        tokens = self._samplers[mode](logits, params, self.seen[rows], self.eos_mask, mode)
        # A device-side True: a Python scalar would be a host-to-device copy inside the captured step.
        self.seen.index_put_((rows, tokens), self._true)
        return tokens

    def _decode(self, rows: list[Sequence]) -> torch.Tensor:
        """Decode and sample the running rows (rows 0..n-1); returns their new tokens, [n].

        The forward is captured per (batch, KV length) and the sampling per (batch, sampling mode): the
        mode is the cheapest way of ranking the vocabulary that serves every row (see the sampler)."""
        n = len(rows)
        kv_len = self._kv_len(rows)
        mode = self._mode(rows)
        if not self.use_graphs:
            self._decode_static(n, kv_len)
            return self._sample_decoded(n, MODES.index(mode))
        batch = _bucket(n, BATCH_BUCKETS, self.max_rows)
        self._graph("decode", batch, kv_len)[0].replay()
        graph, tokens = self._graph("sample", batch, MODES.index(mode))
        graph.replay()
        return tokens[:n]

    def _kv_len(self, rows: list[Sequence]) -> int:
        """How much of the cache a decode of `rows` reads: the longest context, bucketed."""
        return _bucket(max(seq.context_len for seq in rows), KV_LEN_BUCKETS, self.config.max_seq_len)

    def _mode(self, rows: list[Sequence]) -> str:
        params = (seq.params for seq in rows)
        return sampling_mode(((p.temperature, p.top_k, p.top_p) for p in params), self.vocab_size)

    def _decode_static(self, batch: int, kv_len: int) -> torch.Tensor:
        """Decode rows 0..batch-1 from the static input buffers only, so it can be captured; their last
        hidden states land in `_hidden`."""
        self._static.feed_previous(self._last_tokens)
        hidden = self._hidden[:batch]
        hidden.copy_(self._decode_forward(batch, kv_len))
        return hidden

    def _sample_decoded(self, batch: int, mode: int) -> torch.Tensor:
        """Sample rows 0..batch-1 from the decode forward's hidden states (`mode` indexes MODES)."""
        static = self._static
        logits = self.head(self._hidden[:batch])
        return self._sample(logits, static.sampling(0, batch), static.rows[:batch], MODES[mode])

    def _decode_hidden(self, batch: int, kv_len: int) -> torch.Tensor:
        # Row b feeds its last token at position pos[b] and attends to 0..pos[b].
        static = self._static
        positions = static.positions[:batch]
        self.cache.for_forward(static.rows[:batch], positions, None, kv_len)
        hidden = self._forward(static.ids[:batch], positions, self._decode_mask(batch, kv_len), self.cache)
        return hidden[:, -1]

    def _decode_mask(self, batch: int, kv_len: int) -> Mask:
        """[batch, 1, 1, kv_len] per layer kind: row b's query at its position, over its cached keys."""
        positions = self._static.positions[:batch]
        return self.masks.for_queries(positions, self._static.key_index[:kv_len], positions[:, 0] + 1)

    def _graph(self, kind: str, *shape: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured graph of this kind ("decode": batch, KV length; "sample": batch, mode index;
        "prefill": rows, width) and the tensor it writes (hidden states for "decode", else tokens)."""
        key: tuple[str | int, ...] = (kind, *shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(kind, shape)
        return self._graphs[key]

    def _capture(self, kind: str, shape: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Decode padding rows (past the live rows) read and write the null block: their table rows are
        # empty.
        if kind == "decode":
            run = lambda: self._decode_static(*shape)  # noqa: E731
        elif kind == "sample":
            run = lambda: self._sample_decoded(*shape)  # noqa: E731
        else:
            run = lambda: self._prefill_static(*shape)  # noqa: E731
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels, workspaces and autotuning off the graph
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            tokens = run()
        self._graph_pool = graph.pool()
        log.debug("graph captured", kind=kind, shape=shape)
        return graph, tokens

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run one real forward (every device), then compile (with --compile) and capture every graph, so
        no request pays for either. ModelRunError when the model cannot run here."""
        self.check_forward()
        if not self.use_graphs:
            return
        self._static.clear()
        self._prefill_in.clear()
        started = time.perf_counter()
        if self.config.compile:
            log.info("compiling the step (torch.compile: minutes on a first start, less with a warm cache)")
            self._compile()
            log.info("step compiled", seconds=round(time.perf_counter() - started, 1))
        log.info("capturing step graphs", batch_sizes=len(self._batches_and_lengths()[0]))
        self._capture_or_fall_back()
        if self.use_graphs:
            seconds = round(time.perf_counter() - started, 1)
            log.info("step graphs captured", graphs=len(self._graphs), seconds=seconds)

    def _capture_or_fall_back(self) -> None:
        """Capture every graph. A compiled step that cannot be captured runs uncompiled (captured, but
        unfused); a step that cannot be captured at all runs eagerly (transformers' grouped-GEMM experts
        copy from the host inside their forward, say), slower but the same tokens."""
        try:
            self._capture_all()
            return
        except Exception as err:
            self._graphs.clear()
            compiled_any = self._regional or self._decode_forward != self._decode_hidden
            if compiled_any or set(self._samplers.values()) != {sample_rows}:
                log.warning(
                    "capturing the compiled step failed; decoding without torch.compile", error=_brief(err)
                )
                self._uncompile_forward()
                self._samplers = dict.fromkeys(MODES, sample_rows)
                self._uncompile_layers()
                self._capture_or_fall_back()
                return
            log.warning(
                "this model's step cannot be captured in CUDA graphs; running it eagerly", error=_brief(err)
            )
            self.use_graphs = False

    def check_forward(self) -> None:
        """A two-token prompt through the model, its masks and its head, as a prefill runs it: a model the
        engine cannot run fails here, before the server says it is ready, not on every request."""
        try:
            self.head(self._trial_prefill(1, 2, PassThroughCache())[:, -1])
        except Exception as err:
            raise ModelRunError(f"the model failed its first forward: {_brief(err)[:300]}") from err
        self.cache.kernel_reads = self.kernel_reads
        log.info("decode attention", reads="paged kernel" if self.kernel_reads else "gathered blocks")

    def _trial_prefill(self, rows: int, width: int, cache: PassThroughCache) -> torch.Tensor:
        """The hidden states of `rows` prompts of `width` tokens from position 0, through a cache that
        keeps nothing (the KV pool is not touched). It also finds whether every layer's attention came
        through the paged-attention entry points, so that decode steps can hand it the pools and block
        tables instead of gathered copies (`kernel_reads`)."""
        ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        positions = torch.arange(width, device=self.device)[None].expand(rows, -1)
        lengths = torch.full((rows,), width, device=self.device)
        paged_attention.context.calls = 0
        hidden = self._forward(ids, positions, self._causal_mask(lengths, width), cache)
        layers = getattr(self.base.config, "num_hidden_layers", None)
        taken = paged_attention.context.calls == layers
        self.kernel_reads = paged_attention.available(self.device) and taken
        return hidden

    def _batches_and_lengths(self) -> tuple[list[int], list[int]]:
        batches = sorted({_bucket(b, BATCH_BUCKETS, self.max_rows) for b in BATCH_BUCKETS})
        kv_lens = sorted({_bucket(b, KV_LEN_BUCKETS, self.config.max_seq_len) for b in KV_LEN_BUCKETS})
        return batches, kv_lens

    def _compile(self) -> None:
        """torch.compile the model and the sampler, each part on its own: a part that fails to compile
        runs uncompiled. Compiled on the default stream, outside any capture, by running the smallest and
        largest shapes (so the shapes in between find a graph with those sizes symbolic).

        The model: a Falcon multi-query model's layers as two compiled regions shared by all layers
        (prefill too); any other model's whole decode forward (one layer after another: minutes).

        The full-sort sampler stays uncompiled: inductor (torch 2.11) fails to generate its cumsum over a
        dynamic vocabulary, and the sort dominates it anyway."""
        batches, kv_lens = self._batches_and_lengths()
        decode_shapes = {(batches[0], kv_lens[0]), (batches[-1], kv_lens[0]), (batches[-1], kv_lens[-1])}
        self._regional = regional_layers(self.base)
        if self._regional:
            # Falcon multi-query: the layer's two tensor-only parts compile once for every layer, decode
            # and prefill alike, instead of tracing the whole model.
            compile_regions(self._regional, torch.compile)
            with self._or_uncompiled("the model's layers; they run uncompiled", self._uncompile_layers):
                for batch, kv_len in decode_shapes:
                    self._decode_static(batch, kv_len)
                for rows, width in self._prefill_shapes[:1] + self._prefill_shapes[-1:]:
                    self._prefill_static(rows, width)
        else:
            self._decode_forward = torch.compile(self._decode_hidden, dynamic=True)
            with self._or_uncompiled("the decode forward; it runs uncompiled", self._uncompile_forward):
                for batch, kv_len in decode_shapes:
                    self._decode_static(batch, kv_len)
        compiled = torch.compile(sample_rows, dynamic=True)
        for mode in (PLAIN, TOP_K):
            self._samplers[mode] = compiled
            undo = functools.partial(self._samplers.__setitem__, mode, sample_rows)
            with self._or_uncompiled("a sampler; it runs uncompiled", undo, mode=mode):
                for batch in {batches[0], batches[-1]}:
                    self._sample_decoded(batch, MODES.index(mode))

    @contextlib.contextmanager
    def _or_uncompiled(self, what: str, undo: Callable[[], None], **context: str) -> Iterator[None]:
        """Around a freshly compiled part's warm-up runs (which compile it): if they fail, log why and
        `undo`, so the part runs uncompiled, and go on."""
        try:
            yield
            torch.cuda.synchronize(self.device)
        except Exception as err:
            log.warning(f"torch.compile failed on {what}", error=_brief(err), **context)
            undo()

    def _uncompile_forward(self) -> None:
        self._decode_forward = self._decode_hidden

    def _uncompile_layers(self) -> None:
        restore_layers(self._regional)
        self._regional = []

    def _capture_all(self) -> None:
        batches, kv_lens = self._batches_and_lengths()
        for kv_len in kv_lens:
            for batch in batches:
                self._graph("decode", batch, kv_len)
        for mode in range(len(MODES)):
            for batch in batches:
                self._graph("sample", batch, mode)
        for shape in self._prefill_shapes:
            self._graph("prefill", *shape)
        torch.cuda.synchronize(self.device)


def _brief(err: Exception) -> str:
    # Enough of a compiler's error to see which kernel failed and why, not its whole generated source.
    return f"{type(err).__name__}: {err}"[:4000]


class _BlockTables:
    """The host's copy of the per-row block tables, updated for the rows that changed, and sent to the
    cache's device tables once a step (rows 0..n-1, and rows left empty since the last step)."""

    def __init__(self, device_tables: torch.Tensor) -> None:
        pinned = device_tables.device.type == "cuda"
        self.device_tables = device_tables
        self.host = torch.zeros(device_tables.shape, dtype=torch.long)
        self._staging = torch.zeros((2, *device_tables.shape), dtype=torch.long, pin_memory=pinned)
        self._turn = 0
        self._owners: list[list[int] | None] = [None] * device_tables.shape[0]  # each row's block list
        self._lengths = [0] * device_tables.shape[0]  # how much of it the host table has
        self._used = 0  # rows the device tables may have non-empty

    def update(self, batch: ScheduledBatch) -> None:
        for src, dst in batch.moves:
            self.host[dst] = self.host[src]
            self._owners[dst], self._lengths[dst] = self._owners[src], self._lengths[src]
        rows = batch.rows
        for row, seq in enumerate(rows):
            blocks = seq.blocks
            if self._owners[row] is not blocks:
                self._owners[row], self._lengths[row] = blocks, 0
                self.host[row].fill_(NULL_BLOCK)
            known = self._lengths[row]
            if len(blocks) > known:
                self.host[row, known : len(blocks)] = torch.tensor(blocks[known:])
                self._lengths[row] = len(blocks)
        for row in range(len(rows), self._used):
            self._owners[row], self._lengths[row] = None, 0
            self.host[row].fill_(NULL_BLOCK)
        count, self._used = max(len(rows), self._used), len(rows)
        self._turn ^= 1
        staging = self._staging[self._turn, :count]
        staging.copy_(self.host[:count])
        self.device_tables[:count].copy_(staging, non_blocking=True)


class _StaticInputs:
    """Fixed-address input buffers of the decode step, refilled before each (graph) run.

    The pinned host tables are double-buffered: while one step's copies may still be queued on the
    device, the next step fills the other pair.
    """

    # Columns of the integer table: token in, its position, top_k, seed, step, EOS banned, and the row's
    # index in the previous step's output when its token comes from there (else -1).
    LONGS = 7

    def __init__(self, rows: int, max_len: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._host_longs = torch.zeros(2, rows, self.LONGS, dtype=torch.long, pin_memory=pinned)
        self._host_floats = torch.zeros(2, rows, 3, dtype=torch.float32, pin_memory=pinned)
        self._host_tokens = torch.zeros(2, rows, dtype=torch.long, pin_memory=pinned)
        self._turn = 0
        self.longs = torch.zeros_like(self._host_longs[0], device=device)
        self.floats = torch.zeros_like(self._host_floats[0], device=device)
        self.ids, self.positions = self.longs[:, 0:1], self.longs[:, 1:2]
        self.rows = torch.arange(rows, device=device)
        self.key_index = torch.arange(max_len, device=device)
        self._padding = torch.tensor([0, 0, 0, 0, 0, 0, -1])

    def load(self, rows: list[Sequence]) -> None:
        """Two small host-to-device copies per step carry every row's inputs and sampling parameters.

        Rows past the live ones (a graph's padding, and the spare row) are greedy, token 0 at position 0:
        their block tables are empty, so they write and read only the null block."""
        self._turn ^= 1
        longs, floats = self._host_longs[self._turn], self._host_floats[self._turn]
        n = len(rows)
        longs[n:] = self._padding
        floats[n:] = 0
        longs[:n] = torch.tensor([_long_inputs(seq) for seq in rows])
        floats[:n] = torch.tensor(
            [[seq.params.temperature, seq.params.top_p, seq.params.repetition_penalty] for seq in rows]
        )
        self.longs.copy_(longs, non_blocking=True)
        self.floats.copy_(floats, non_blocking=True)

    def host_tokens(self) -> torch.Tensor:
        """The pinned buffer this step's tokens are copied back into."""
        return self._host_tokens[self._turn]

    def feed_previous(self, last_tokens: torch.Tensor) -> None:
        """On the device: rows whose token is still in flight take it from the previous step's output."""
        source = self.longs[:, 6]
        fed = last_tokens[source.clamp(min=0)]
        self.longs[:, 0] = torch.where(source >= 0, fed, self.longs[:, 0])

    def sampling(self, start: int, stop: int) -> SamplingTensors:
        """Sampling parameters of batch rows start..stop-1."""
        return self._sampling(self.longs[start:stop], self.floats[start:stop])

    def sampling_rows(self, rows: torch.Tensor) -> SamplingTensors:
        """Sampling parameters of the given batch rows (a device tensor of row indices)."""
        return self._sampling(self.longs[rows], self.floats[rows])

    @staticmethod
    def _sampling(longs: torch.Tensor, floats: torch.Tensor) -> SamplingTensors:
        return SamplingTensors(
            temperature=floats[:, 0],
            top_p=floats[:, 1],
            penalty=floats[:, 2],
            top_k=longs[:, 2],
            seeds=longs[:, 3],
            steps=longs[:, 4],
            ban_eos=longs[:, 5].bool(),
        )

    def clear(self) -> None:
        self.longs[:] = self._padding
        self.floats.zero_()


class _PrefillInputs:
    """Fixed-address inputs of a prefill: the newcomers' uncached tokens as [rows, width], laid out flat
    so every padded shape is a contiguous prefix, and per row how many tokens it prefills, its batch row
    (the spare row for padding rows) and how many leading tokens it found cached. Pinned host tables
    are double-buffered like `_StaticInputs`."""

    def __init__(self, max_tokens: int, max_rows: int, spare_row: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._host_ids = torch.zeros(2, max_tokens, dtype=torch.long, pin_memory=pinned)
        self._host_rows = torch.zeros(2, max_rows, 3, dtype=torch.long, pin_memory=pinned)
        self._turn = 0
        self.ids = torch.zeros_like(self._host_ids[0], device=device)
        self.rows = torch.zeros_like(self._host_rows[0], device=device)
        self.spare_row = spare_row

    def load(self, rows: list[Sequence], n: int, width: int) -> None:
        """Fill `n` rows of `width` tokens: the newcomers, then padding rows (copies of the first one,
        in the spare row)."""
        self._turn ^= 1
        ids, table = self._host_ids[self._turn, : n * width].view(n, width), self._host_rows[self._turn]
        tails = [seq.tokens[seq.num_cached :] for seq in rows]
        ids[: len(rows)] = torch.tensor([tail + tail[:1] * (width - len(tail)) for tail in tails])
        ids[len(rows) :] = ids[0]
        table[: len(rows)] = torch.tensor(
            [[len(tail), seq.slot, seq.num_cached] for seq, tail in zip(rows, tails, strict=True)]
        )
        table[len(rows) : n] = table[0]
        table[len(rows) : n, 1] = self.spare_row
        self.ids[: n * width].copy_(ids.view(-1), non_blocking=True)
        self.rows[:n].copy_(table[:n], non_blocking=True)

    def clear(self) -> None:
        """Inputs that are safe to capture with: one-token prompts from position 0 in the spare row."""
        self.ids.zero_()
        self.rows[:] = torch.tensor([1, self.spare_row, 0])


def _long_inputs(seq: Sequence) -> list[int]:
    # Counted from what has been launched, so a row with a token in flight is described one step on.
    made = seq.launched
    banned = made < seq.params.min_new_tokens
    source = seq.row_index if seq.in_flight else -1
    position = seq.num_prompt_tokens + made - 1
    return [seq.last_token, position, seq.params.top_k, seq.seed, made, banned, source]


def _memory_cap(device: torch.device) -> float:
    """The share of the device this process may use (torch.cuda.set_per_process_memory_fraction)."""
    return float(torch.cuda.get_per_process_memory_fraction(device))


def _available_memory() -> int | None:
    """Bytes of memory available to allocate on this machine (Linux), or None where it cannot tell."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
