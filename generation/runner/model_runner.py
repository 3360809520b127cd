"""ModelRunner: one engine step on the device: prefill, batched decode (CUDA graphs on a GPU) over the
paged KV cache, and sampling. Its inputs (`inputs`), KV planning (`memory`), graphs (`graphs`) and
torch.compile (`compiled`) are modules of their own."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from transformers import PreTrainedModel

from trickle.generation import linear
from trickle.generation.engine_config import EngineConfig
from trickle.generation.head import ModelHead
from trickle.generation.kv import attention as paged_attention
from trickle.generation.kv.cache import PagedKVCache, PassThroughCache
from trickle.generation.masks import AttentionMasks, Mask, UnsupportedModelError, alibi_from_4d
from trickle.generation.messages import TokenLogprobs
from trickle.generation.models import adapt, decoder_layers
from trickle.generation.params import MAX_LOGPROBS
from trickle.generation.runner.compiled import CompiledParts, brief, cache_dir
from trickle.generation.runner.graphs import (
    BATCH_BUCKETS,
    KV_LEN_BUCKETS,
    PREFILL_ROW_BUCKETS,
    PREFILL_WIDTH_BUCKETS,
    Part,
    StepGraphs,
    bucket,
    buckets_up_to,
)
from trickle.generation.runner.inputs import BlockTables, GrammarMasks, PrefillInputs, RowHistory, StepInputs
from trickle.generation.runner.memory import PREFILL_READ_FACTOR, StepLimits, plan_blocks
from trickle.generation.sampler import FULL, MODES, SamplingTensors, sample_rows, sampling_mode
from trickle.generation.scheduler import ScheduledBatch
from trickle.generation.sequence import Sequence

log = structlog.get_logger("generation.runner")

# How much cheaper a mixed newcomer's reads of its own blocks are than reading them from memory (its
# tokens read them in one kernel, so mostly from the L2 cache); an estimate that the H200 runs of the
# Llama-7B shape check (bench/results/h200-session19/NOTES.md).
L2_REUSE = 4


def _cache_argument(module: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.x; pass whichever this version takes.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class ModelRunError(RuntimeError):
    """The model cannot run in the engine (found by the forward `warm_up` runs first)."""


class StepClock:
    """Times a step's parts: marks at its start, after its decode part and after its prefill part. CUDA
    events on a GPU (read once the step is done); the host's clock elsewhere, where each part runs
    inline."""

    def __init__(self, device: torch.device) -> None:
        self.on_device = device.type == "cuda"
        # Two sets: the step launched next records into one while the step in flight may still be read
        # from the other.
        self._sets = [
            [torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(2 * self.on_device)
        ]

    def start(self) -> list[Any]:
        if not self.on_device:
            return [time.perf_counter()]
        marks = self._sets.pop(0)
        self._sets.append(marks)
        marks[0].record()
        return marks

    def mark(self, marks: list[Any], index: int) -> None:
        if self.on_device:
            marks[index].record()
        else:
            marks.append(time.perf_counter())

    @staticmethod
    def seconds(marks: list[Any], start: int, end: int) -> float:
        """Between two marks; on a GPU, only once the step is done."""
        if isinstance(marks[start], float):
            return float(marks[end] - marks[start])
        return float(marks[start].elapsed_time(marks[end])) / 1000


class StepLogprobs:
    """The log-probabilities of a step's tokens, for the steps where any row asked for them: from the
    rows' last hidden states through the head again (a step where none asked pays nothing), as the
    model's distribution gives them (before temperature and penalties).

    One float32 row per batch row: the sampled token's log-probability, then the MAX_LOGPROBS most
    likely token ids (exact in float32 below 2**24), then their log-probabilities."""

    WIDTH = 1 + 2 * MAX_LOGPROBS

    def __init__(self, max_rows: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._host = torch.zeros(2, max_rows, self.WIDTH, dtype=torch.float32, pin_memory=pinned)
        self._turn = 0

    @staticmethod
    def compute(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[rows, V] logits and the [rows] sampled tokens -> [rows, WIDTH]."""
        logprobs = logits.float().log_softmax(dim=-1)
        top = logprobs.topk(min(MAX_LOGPROBS, logprobs.shape[-1]), dim=-1)
        table = torch.full((logits.shape[0], StepLogprobs.WIDTH), float("nan"), device=logits.device)
        table[:, 0] = logprobs.gather(1, tokens[:, None]).squeeze(1)
        k = top.indices.shape[1]
        table[:, 1 : 1 + k] = top.indices.float()
        table[:, 1 + MAX_LOGPROBS : 1 + MAX_LOGPROBS + k] = top.values
        return table

    def to_host(self, table: torch.Tensor) -> torch.Tensor:
        """Queue the table's copy into a pinned buffer (double-buffered, as the step's tokens are)."""
        self._turn ^= 1
        host = self._host[self._turn, : table.shape[0]]
        host.copy_(table, non_blocking=True)
        return host


def token_logprobs(row: Any, token: int, count: int) -> TokenLogprobs:
    """A row of a collected `StepLogprobs` table, for a request that asked for `count` alternatives."""
    return TokenLogprobs(
        token,
        float(row[0]),
        row[1 : 1 + count].astype(int).tolist(),
        row[1 + MAX_LOGPROBS : 1 + MAX_LOGPROBS + count].tolist(),
    )


@dataclass
class Launched:
    """A step queued on the device: its rows, how many of them decoded, and where its tokens land."""

    rows: list[Sequence]
    num_decode: int
    tokens: torch.Tensor
    done: torch.cuda.Event | None  # recorded after the copy to `tokens`; None where the step ran inline
    marks: list[Any]  # StepClock's: start, decode part done, prefill part done
    prefill_tokens: int = 0
    """The tokens the prefill part ran as, padding included."""
    decode_seconds: float = 0.0
    """The decode part's time (forward and sampling), known once `collect` returned."""
    prefill_seconds: float = 0.0
    """The prefill part's time, known once `collect` returned."""
    logprobs: torch.Tensor | None = None
    """Where any row asked for them: its rows' log-probabilities (`StepLogprobs`' layout), on the host
    (readable once `collect` returned)."""
    constrained: bool = False
    """Rows of the step follow grammars: the next step's masks need its tokens on the host."""
    partial: frozenset[int] = frozenset()
    """Rows (indices) whose prefill was a chunk of their prompt: their tokens are not theirs."""

    @property
    def decode_device_seconds(self) -> float:
        """The decode part's time on a GPU; 0 where the step ran inline on the host."""
        return self.decode_seconds if self.done is not None else 0.0


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
        # Decode attention reads the blocks in place: found by each trial prefill (`_trial_prefill`).
        self.kernel_reads = False
        self.max_rows = config.max_batch_size
        self.spare_row = self.max_rows  # the per-row tables' extra row: padding rows read and write it
        self.block_size = config.kv_block_size
        # bitsandbytes kernels sync with the host inside their forward: they run eagerly.
        quantized = getattr(model, "is_quantized", False)
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda" and not quantized
        # Before the KV plan measures what memory is left, as fusing copies weights.
        probe = self._probe(fuse=self.use_graphs and config.compile)
        self.num_blocks = self._plan_blocks()
        # Newcomers' tokens a decode forward may take beside its rows, and what they may read.
        self.mixed_tokens, self.mixed_read_limit = self._mixing(model, probe)
        self.table_width = -(-config.max_seq_len // self.block_size)
        self.cache = PagedKVCache(
            self.num_blocks, self.block_size, self.max_rows + 1, self.table_width, self.device
        )
        self._tables = BlockTables(self.cache.tables)
        self._prefill_shapes = self._graph_prefill_shapes()
        self._static = StepInputs(self.max_rows + 1, self.mixed_tokens, config.max_seq_len, self.device)
        # The previous step's sampled tokens, in its row order: the next step's inputs for its rows.
        self._last_tokens = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        # The decode forward's last hidden states (its rows', then its mixed tokens'), where the step's
        # sampling (its own graph) reads the rows'.
        self._hidden = torch.zeros(
            self.max_rows + self.mixed_tokens, self.hidden_size, dtype=self.dtype, device=self.device
        )
        # A prefill's last hidden states (one a newcomer), where the log-probabilities read them.
        self._prefill_hidden = torch.zeros_like(self._hidden[: self.max_rows])
        self._logprobs = StepLogprobs(self.max_rows, self.device)
        self._grammar = GrammarMasks(self.max_rows + 1, self.vocab_size, self.device)
        self._constrained = False  # the step being launched has rows that follow a grammar
        # seen[row, token]: the token is in the row's prompt or output (for the repetition penalty); the
        # spare row takes what padding rows write
        self.seen = torch.zeros(self.max_rows + 1, self.vocab_size, dtype=torch.bool, device=self.device)
        # counts[row, token]: times the token is in the row's output (frequency and presence penalties)
        self.counts = torch.zeros(self.max_rows + 1, self.vocab_size, dtype=torch.int32, device=self.device)
        self._history = RowHistory(self.seen, self.counts)
        self._prefill_in = PrefillInputs(self.max_prefill_tokens, self.max_rows, self.spare_row, self.device)
        self.token_ids = torch.arange(self.vocab_size, device=self.device)  # the sampler reads them
        self.eos_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.eos_mask[[i for i in eos_ids if i < self.vocab_size]] = True
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._clock = StepClock(self.device)
        self.graphs = StepGraphs(self.device, self._run_part)
        # The layers and samplers as they run; `warm_up` compiles them (unless --no-compile).
        self.compiled = CompiledParts(self.base)

    # ------------------------------------------------------------ planning

    def _plan_blocks(self) -> int:
        limits = StepLimits(
            max_rows=self.max_rows,
            max_prefill_tokens=self.max_prefill_tokens,
            prefill_read_budget=self.prefill_read_budget,
            vocab_size=self.vocab_size,
            layers=getattr(self.base.config, "num_hidden_layers", None) or 1,
        )
        return plan_blocks(
            self.config, self.device, limits, self._trial_prefill, lambda: not self.kernel_reads
        )

    def _probe(self, fuse: bool) -> PassThroughCache | None:
        """A two-token forward before planning: it finds whether the paged kernel reads the blocks
        (`kernel_reads`) and what a position's keys and values take (the returned cache's
        `bytes_per_token`); None where the model cannot run (`check_forward` says why, before the server
        is ready).

        `fuse`, and the decoder layers will compile (their attention takes the paged kernel): the linear
        layers the forward fed one input are fused (`generation.linear`), so the compiled layers read
        each group's weights in one product. Each group's weights are copied once into one matrix and
        the old ones released: memory grows by one group at most, for a moment."""
        trial = PassThroughCache()
        layers = decoder_layers(self.base) if fuse else []
        try:
            groups = linear.siblings(layers, lambda: self._trial_prefill(1, 2, trial))
        except Exception:
            return None
        if groups and self.kernel_reads:
            for group in groups:
                linear.fuse(group)
                torch.cuda.empty_cache()
            sizes = sorted({len(group) for group in groups})
            log.info("linear layers that read one input, fused", groups=len(groups), sizes=sizes)
        return trial

    def _mixing(self, model: PreTrainedModel, probe: PassThroughCache | None) -> tuple[int, int | None]:
        """How many newcomers' tokens a decode forward may take beside its rows (`mixed_prefill_tokens`),
        and how many positions those tokens may read in all, or None for no limit.

        A mixed token attends as a decoding row does: reading its context once for itself. On a GPU
        that pays while it reads less than a forward of its own would (every weight once from memory).
        A newcomer's tokens read the same blocks in one kernel, mostly from the L2 cache, counted at
        `L2_REUSE` times cheaper than memory: so the limit is that many times the weights' bytes over
        a position's keys and values. Mixing needs the paged kernel, which reads the blocks in place
        (gathering a row's positions for each token would cost far more). On the CPU, where the
        engine's exactness is tested, newcomers mix with no limit."""
        # While rows decode the step's prefill budget is the smaller of the two: no more can mix.
        tokens = min(self.config.mixed_prefill_tokens, self.config.prefill_token_budget)
        if not tokens or self.device.type != "cuda":
            return tokens, None
        if probe is None or not self.kernel_reads or not probe.bytes_per_token:
            return 0, None
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return tokens, L2_REUSE * weights // probe.bytes_per_token

    # ------------------------------------------------------------ the step

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, meanwhile: Callable[[], None] | None = None) -> Launched:
        """Queue the batch's step on the device and return at once; `collect` waits for its tokens.

        A row whose previous token is still in flight (`seq.in_flight`) is fed that token on the device,
        from the previous step's output, so the host never waits between two steps. `meanwhile` is
        called once the decode forward is queued and before anything samples: the engine collects the
        previous step there when rows follow grammars (their masks need its tokens), while the device
        runs the forward.
        """
        for src, dst in batch.moves:
            self.seen[dst] = self.seen[src]
            self.counts[dst] = self.counts[src]
        self._tables.update(batch)
        # The rows' inputs and sampling parameters: decoding rows advance on the device, and one pair of
        # host-to-device copies carries the rows that changed and the mixed newcomers' tokens.
        mixed, apart = batch.prefill[: batch.mixed], batch.prefill[batch.mixed :]
        self._static.load(batch.rows, len(batch.decode), len(mixed))
        # Mixed newcomers sample with the decoding rows: their histories first. Those prefilled apart are
        # marked in `_prefill`, after the decode sampling, whose padding rows may write into their rows.
        if mixed:
            self._history.mark(mixed)
        marks = self._clock.start()
        forward = batch.decode + mixed
        decoding = self._decode_forward(forward, self._static.forward - len(forward)) if forward else None
        if meanwhile is not None:
            meanwhile()
        self._constrained = self._grammar.load(batch.rows) if batch.constrained else self._grammar.reset()
        tokens = [self._decode_sample(*decoding)] if decoding is not None else []
        self._clock.mark(marks, 1)
        prefill_tokens = 0
        if apart:
            tokens.append(self._prefill(apart))
            prefill_tokens = self.prefill_size(
                len(apart), max(seq.prefill_to - seq.num_cached for seq in apart)
            )
        self._clock.mark(marks, 2)
        out = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
        self._last_tokens[: out.shape[0]].copy_(out)
        logprobs = None
        if batch.logprobs:
            logprobs = self._step_logprobs(len(forward), len(apart), out)
        if self.device.type != "cuda":
            return Launched(
                batch.rows,
                len(batch.decode),
                out,
                None,
                marks,
                prefill_tokens,
                logprobs=logprobs,
                constrained=self._constrained,
            )
        host = self._static.host_tokens()[: out.shape[0]]
        host.copy_(out, non_blocking=True)
        if logprobs is not None:
            logprobs = self._logprobs.to_host(logprobs)
        done = torch.cuda.Event()
        done.record()
        return Launched(
            batch.rows,
            len(batch.decode),
            host,
            done,
            marks,
            prefill_tokens,
            logprobs=logprobs,
            constrained=self._constrained,
        )

    def _step_logprobs(self, decoded: int, prefilled: int, tokens: torch.Tensor) -> torch.Tensor:
        """Every row's `StepLogprobs` row, from the hidden states its step's sampling read."""
        hidden = torch.cat((self._hidden[:decoded], self._prefill_hidden[:prefilled]))
        return self._logprobs.compute(self.head(hidden), tokens)

    @staticmethod
    def collect(launched: Launched) -> list[int]:
        """The step's sampled tokens, one per row in `launched.rows` order."""
        if launched.done is not None:
            launched.done.synchronize()  # waits with the GIL released: the event loop keeps serving
        launched.decode_seconds = StepClock.seconds(launched.marks, 0, 1)
        launched.prefill_seconds = StepClock.seconds(launched.marks, 1, 2)
        return launched.tokens.tolist()

    def step(self, batch: ScheduledBatch) -> list[int]:
        """Launch and collect one step."""
        return self.collect(self.launch(batch))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Mask, cache: object) -> torch.Tensor:
        try:
            out = self.base(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                use_cache=True,
                **{self._cache_arg: cache},
            )
        finally:
            # The forward is over: no later one takes its paged step (`PagedKVCache.for_forward`) for its own.
            paged_attention.context.decode = paged_attention.context.prefill = None
        return out.last_hidden_state

    def _causal_mask(self, lengths: torch.Tensor, width: int) -> Mask:
        # [n, 1, width, width] per layer kind: rows from position 0, keys past each row's length hidden
        keys = torch.arange(width, device=self.device)
        return self.masks.for_queries(keys[None].expand(lengths.shape[0], -1), keys, lengths)

    def _prefill_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """The padded [rows, width] that `rows` newcomers, the longest of `longest` tokens, prefill as."""
        return (
            bucket(rows, PREFILL_ROW_BUCKETS, self.max_rows),
            bucket(longest, PREFILL_WIDTH_BUCKETS, self.config.max_seq_len),
        )

    def prefill_size(self, rows: int, longest: int) -> int:
        """The tokens a prefill of `rows` newcomers, the longest of `longest` uncached tokens, runs as:
        its graph's padded shape, or rows x longest where it runs eagerly (what the scheduler's
        prefill budget counts)."""
        shape = self._prefill_shape(rows, longest)
        if self.use_graphs and shape in self._prefill_shapes:
            return shape[0] * shape[1]
        return rows * longest

    def _prefill(self, rows: list[Sequence]) -> torch.Tensor:
        """Prefill and sample the newcomers; returns their first tokens, [len(rows)].

        Newcomers prefill from their own first uncached position (0 where the prefix cache held none of
        their tokens), captured per padded shape. Past cached positions, attention reads the blocks in
        place (the paged kernels); a model that does not take them prefills eagerly over its rows'
        gathered positions."""
        self._history.mark(rows)
        n, width = len(rows), max(seq.prefill_to - seq.num_cached for seq in rows)
        past = any(seq.num_cached for seq in rows)
        if past and not self.kernel_reads:
            self._prefill_in.load(rows, n, width)
            return self._prefill_static(n, width, max(seq.prefill_to for seq in rows))
        shape = self._prefill_shape(n, width)
        if not self.use_graphs or shape not in self._prefill_shapes:
            self._prefill_in.load(rows, n, width)
            return self._prefill_static(n, width, paged=past)
        graph, tokens = self.graphs.get(Part.PREFIX if past else Part.PREFILL, *shape)
        self._prefill_in.load(rows, *shape)
        graph.replay()
        return tokens[:n]

    def _graph_prefill_shapes(self) -> list[tuple[int, int]]:
        """The padded [rows, width] shapes that get a CUDA graph."""
        rows = buckets_up_to(PREFILL_ROW_BUCKETS, self.max_rows)
        widths = buckets_up_to(PREFILL_WIDTH_BUCKETS, self.config.max_seq_len)
        return [(n, w) for n in rows for w in widths if n * w <= self.max_prefill_tokens]

    def _prefill_static(
        self, n: int, width: int, read_len: int | None = None, paged: bool = False
    ) -> torch.Tensor:
        """Prefill [n, width] from the static buffers only, so it can be captured. Every row from its
        first uncached position: `paged`, attending to its blocks through the paged kernels; else with
        `read_len`, to its positions 0..read_len-1 gathered; else (all from position 0) to its new keys
        alone.

        Short rows are padded with their first token and padding rows repeat the first newcomer; what
        padding writes goes to the null block, and padding rows sample into the spare row."""
        inputs = self._prefill_in
        ids = inputs.ids[: n * width].view(n, width)
        lengths, rows, cached = inputs.rows[:n].unbind(1)
        offsets = self._static.key_index[:width][None]
        positions = cached[:, None] + offsets
        self.cache.for_forward(rows, positions, offsets < lengths[:, None], read_len, paged)
        if read_len is None:  # the paged kernels need no mask: the model gets the plain causal one
            mask = self._causal_mask(lengths, width)
        else:
            mask = self.masks.for_queries(positions, self._static.key_index[:read_len], cached + lengths)
        hidden = self._forward(ids, positions, mask, self.cache)
        last = hidden[self._static.rows[:n], lengths - 1]
        self._prefill_hidden[:n].copy_(last)
        params = self._static.sampling_rows(rows)
        return self._sample(self.head(last), params, rows, self.seen[rows], self.counts[rows], masked=True)

    def _sample(
        self,
        logits: torch.Tensor,
        params: SamplingTensors,
        rows: torch.Tensor,
        seen: torch.Tensor,
        counts: torch.Tensor,
        mode: str = FULL,
        masked: bool = False,
    ) -> torch.Tensor:
        """Sample `rows` (their `seen` and `counts`, as views or copies) and add each one's token to
        its history. Each row takes only what its grammar allows where `masked` (a prefill, whose graphs
        sample inside, or a decode step with constrained rows, `Part.MASKED`; a row without a grammar
        allows everything), or uncaptured in a step with constrained rows. Masked sampling runs the
        uncompiled sampler (no compiled variant for a rare mask); captured, that costs no host time."""
        if masked or self._constrained:
            allowed = self._grammar.allowed(rows)
            tokens = sample_rows(logits, params, seen, counts, self.eos_mask, mode, allowed, self.token_ids)
        else:
            sampler = self.compiled.samplers[mode]
            tokens = sampler(logits, params, seen, counts, self.eos_mask, mode, token_ids=self.token_ids)
        # A device-side True: a Python scalar would be a host-to-device copy inside the captured step.
        self.seen.index_put_((rows, tokens), self._true)
        self.counts.index_put_((rows, tokens), self.counts[rows, tokens] + 1)
        return tokens

    def _decode(self, rows: list[Sequence]) -> torch.Tensor:
        """Decode and sample the running rows (rows 0..n-1); returns their new tokens, [n]."""
        return self._decode_sample(*self._decode_forward(rows))

    def _decode_forward(self, rows: list[Sequence], after: int = 0) -> tuple[int, int, int]:
        """Queue the forward of rows 0..n-1 and the `after` entries that follow them (`StepInputs.forward`:
        mixed newcomers' tokens, and the rows prefilled apart before them); their last hidden states land
        in `_hidden`. Returns what `_decode_sample` needs: the rows, the captured batch and the sampling
        mode.

        The forward is captured per (rows and mixed tokens, KV length) and the sampling per (rows,
        sampling mode): the mode is the cheapest way of ranking the vocabulary that serves every row
        (see the sampler)."""
        n = len(rows)
        kv_len = self._kv_len(rows)
        mode = MODES.index(self._mode(rows))
        if not self.use_graphs:
            self._decode_static(n + after, kv_len)
            return n, n, mode
        entries = bucket(n + after, BATCH_BUCKETS, self.max_rows + self.mixed_tokens)
        self.graphs.get(Part.DECODE, entries, kv_len)[0].replay()
        return n, bucket(n, BATCH_BUCKETS, self.max_rows), mode

    def _decode_sample(self, n: int, batch: int, mode: int) -> torch.Tensor:
        """Sample the decoded rows; returns their new tokens, [n]. A step with rows that follow grammars
        applies their masks."""
        if not self.use_graphs:
            return self._sample_decoded(n, mode)
        graph, tokens = self.graphs.get(Part.MASKED if self._constrained else Part.SAMPLE, batch, mode)
        graph.replay()
        return tokens[:n]

    def _kv_len(self, rows: list[Sequence]) -> int:
        """How much of the cache a decode of `rows` reads: the longest context, bucketed."""
        return bucket(max(seq.context_len for seq in rows), KV_LEN_BUCKETS, self.config.max_seq_len)

    def _mode(self, rows: list[Sequence]) -> str:
        params = (seq.params for seq in rows)
        return sampling_mode(((p.temperature, p.top_k, p.top_p) for p in params), self.vocab_size)

    def _decode_static(self, batch: int, kv_len: int) -> torch.Tensor:
        """Run entries 0..batch-1 (rows, then mixed tokens) from the static input buffers only, so it can
        be captured; their last hidden states land in `_hidden`."""
        self._static.feed_previous(self._last_tokens)
        hidden = self._hidden[:batch]
        hidden.copy_(self._decode_hidden(batch, kv_len))
        return hidden

    def _sample_decoded(self, batch: int, mode: int, masked: bool = False) -> torch.Tensor:
        """Sample rows 0..batch-1 from the decode forward's hidden states (`mode` indexes MODES), with
        their grammars' masks where `masked`."""
        static = self._static
        logits = self.head(self._hidden[:batch])
        params = static.sampling(0, batch)
        seen, counts = self.seen[:batch], self.counts[:batch]
        return self._sample(logits, params, static.rows[:batch], seen, counts, MODES[mode], masked)

    def _decode_hidden(self, batch: int, kv_len: int) -> torch.Tensor:
        # Entry b feeds its token at position pos[b] and attends to 0..pos[b] of its table row's blocks
        # (the paged kernel reads those its step adds from the step's keys, as it stores them).
        static = self._static
        positions = static.positions[:batch]
        fresh = (static.earlier[:batch], static.first[:batch])
        self.cache.for_forward(static.tables[:batch], positions, None, kv_len, self.kernel_reads, fresh)
        mask = self._decode_mask(batch, kv_len)
        return self._forward(static.ids[:batch], positions, mask, self.cache)[:, -1]

    def _decode_mask(self, batch: int, kv_len: int) -> Mask:
        """[batch, 1, 1, kv_len] per layer kind: row b's query at its position, over its cached keys."""
        positions = self._static.positions[:batch]
        return self.masks.for_queries(positions, self._static.key_index[:kv_len], positions[:, 0] + 1)

    def _run_part(self, part: Part, shape: tuple[int, ...]) -> torch.Tensor:
        """A captured part, from the static inputs only (what its graph replays). Decode padding rows
        (past the live rows) read and write the null block: their table rows are empty."""
        if part is Part.DECODE:
            return self._decode_static(*shape)
        if part is Part.SAMPLE or part is Part.MASKED:
            batch, mode = shape
            return self._sample_decoded(batch, mode, masked=part is Part.MASKED)
        rows, width = shape
        return self._prefill_static(rows, width, paged=part is Part.PREFIX)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run one real forward (every device), then compile (unless --no-compile) and capture every graph, so
        no request pays for either. ModelRunError when the model cannot run here."""
        self.check_forward()
        if not self.use_graphs:
            return
        self._static.clear()
        self._prefill_in.clear()
        started = time.perf_counter()
        if self.config.compile:
            log.info(
                "compiling the decoder layers and the sampler (torch.compile: up to a few minutes on a "
                "first start, much less once inductor's cache holds them)",
                cache=str(cache_dir()),
            )
            self._compile()
            seconds = round(time.perf_counter() - started, 1)
            log.info("compiled", seconds=seconds, layers=len(self.compiled.layers))
        log.info("capturing step graphs", batch_sizes=len(self._batches_and_lengths()[0]))
        self._capture_or_fall_back()
        if self.use_graphs:
            seconds = round(time.perf_counter() - started, 1)
            log.info("step graphs captured", graphs=len(self.graphs), seconds=seconds)

    def _capture_or_fall_back(self) -> None:
        """Capture every graph. A compiled step that cannot be captured runs uncompiled (captured, but
        unfused); a step that cannot be captured at all runs eagerly (transformers' grouped-GEMM experts
        copy from the host inside their forward, say), slower but the same tokens."""
        try:
            self._capture_all()
            return
        except Exception as err:
            self.graphs.clear()
            if self.compiled.any:
                log.warning(
                    "capturing the compiled step failed; decoding without torch.compile", error=brief(err)
                )
                self.compiled.undo()
                self._capture_or_fall_back()
                return
            log.warning(
                "this model's step cannot be captured in CUDA graphs; running it eagerly", error=brief(err)
            )
            self.use_graphs = False

    def check_forward(self) -> None:
        """A two-token prompt through the model, its masks and its head, as a prefill runs it: a model the
        engine cannot run fails here, before the server says it is ready, not on every request."""
        trial = PassThroughCache()
        try:
            self.head(self._trial_prefill(1, 2, trial)[:, -1])
        except Exception as err:
            raise ModelRunError(f"the model failed its first forward: {brief(err)[:300]}") from err
        self.cache.allocate(trial.shapes)
        log.info("decode attention", reads="paged kernel" if self.kernel_reads else "gathered blocks")

    def _trial_prefill(self, rows: int, width: int, cache: PassThroughCache) -> torch.Tensor:
        """The hidden states of `rows` prompts of `width` tokens from position 0, through a cache that
        keeps nothing (the KV pool is not touched). It also finds whether every layer's attention came
        through the paged-attention entry points, so that decode steps can hand it the pools and block
        tables instead of gathered copies (`kernel_reads`)."""
        ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        positions = torch.arange(width, device=self.device)[None].expand(rows, -1)
        lengths = torch.full((rows,), width, device=self.device)
        probe = paged_attention.context.probe = []
        try:
            hidden = self._forward(ids, positions, self._causal_mask(lengths, width), cache)
        finally:
            paged_attention.context.probe = None
        layers = getattr(self.base.config, "num_hidden_layers", None) or 0
        # decode_layer serves layer after layer: every layer's attention must come through, in order.
        taken = probe == list(range(layers))
        self.kernel_reads = paged_attention.available(self.device) and taken
        return hidden

    def _batches_and_lengths(self) -> tuple[list[int], list[int]]:
        """The decode forward's padded sizes (rows and mixed tokens) and KV lengths."""
        return buckets_up_to(BATCH_BUCKETS, self.max_rows + self.mixed_tokens), buckets_up_to(
            KV_LEN_BUCKETS, self.config.max_seq_len
        )

    def _compile(self) -> None:
        entries, kv_lens = self._batches_and_lengths()
        batches = buckets_up_to(BATCH_BUCKETS, self.max_rows)
        self.compiled.compile(
            self.device,
            self._decode_static if self.kernel_reads else None,
            {(entries[0], kv_lens[0]), (entries[-1], kv_lens[0]), (entries[-1], kv_lens[-1])},
            self._sample_decoded,
            {batches[0], batches[-1]},
        )

    def _capture_all(self) -> None:
        entries, kv_lens = self._batches_and_lengths()
        batches = buckets_up_to(BATCH_BUCKETS, self.max_rows)
        for kv_len in kv_lens:
            for size in entries:
                self.graphs.get(Part.DECODE, size, kv_len)
        for mode in range(len(MODES)):
            for batch in batches:
                self.graphs.get(Part.SAMPLE, batch, mode)
                self.graphs.get(Part.MASKED, batch, mode)
        for shape in self._prefill_shapes:
            self.graphs.get(Part.PREFILL, *shape)
            if self.kernel_reads:
                self.graphs.get(Part.PREFIX, *shape)
        torch.cuda.synchronize(self.device)
