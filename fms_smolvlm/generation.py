"""Continuous batching for SmolVLM: slots that take requests as they come, one static KV cache, compiled steps.

The hot path, in the spirit of gpt-fast:

* ``extend``: new tokens for some slots, written into those slots' cache rows at their positions, attending to
  everything their slot holds up to them: a prompt (the vision tower's features in place of its ``<image>``
  tokens), a long prompt's next chunk, or the prompts that continue a prefix they share.
* ``decode_step``: one token for every slot of ``[0, rows)``; positions and masks come from per-slot lengths on
  the device and the next token is chosen in the same graph, so the shapes are static (CUDA graphs on a GPU).
* the scheduler (:meth:`GenerationEngine.step`): every ``sync_every`` decode steps the host reads the new tokens
  once, hands back finished sequences and fills the freed slots with waiting work (vision once per image,
  prompts in bounded chunks so the decoding slots never stall for long). A short caption frees its slot at
  once instead of waiting for the longest one.

Every slot owns a cache row: its sequence starts at position 0, so a token's RoPE position is its cache index,
whatever the slot, its neighbours or their arrival order. A slot that is not decoding writes its (ignored) step
into the row's last position, which no sequence uses. Compiled, each step is a few graphs with dynamic sizes, ready
(compiled, or loaded from an earlier engine's artifact) before the first request: :meth:`GenerationEngine.warmup`.
"""

import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from fms.modules.attention import register_attention_op

from fms_smolvlm.compiled import CompiledStep, CompiledSteps, artifact_key
from fms_smolvlm.processing import SourceImage, tiles_from_sources
from fms_smolvlm.smolvlm import SmolVLM, half_precision_on_cpu

logger = logging.getLogger(__name__)

ATTN_NAME = "smolvlm_slots"
# cache lengths: powers of two with a 1.5x step in between, so at most a third of what is attended is unused
LENGTH_BUCKETS = tuple(sorted({b for k in range(5, 17) for b in (2**k, 3 * 2 ** (k - 1))}))
PAD_MULTIPLE = 8  # extend batches are right-padded to a multiple of this


def round_up(n: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if n <= bucket:
            return bucket
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    powers = [2**k for k in range(max_batch_size.bit_length()) if 2**k < max_batch_size]
    return tuple(powers + [max_batch_size])


def inference_compile_options(device: torch.device) -> dict:
    """Inductor's options for this engine's graphs (scoped to them, not process-wide). On the CPU, the C++ wrapper:
    a graph's kernels are called from C++, not Python, less overhead per decode step. Not freezing: given as an
    option it changes nothing (Dynamo decides at trace time, from the process-wide setting, whether weights may be
    folded, so they stay graph inputs; the generated code is identical), and made effective it would copy and
    prepack the weights into every graph, one per decode shape."""
    return {"cpp_wrapper": True} if device.type == "cpu" else {}


# an extend call costs about this many tokens' work besides its tokens (launch, weights read once)
EXTEND_CALL_TOKENS = 64


def shared_prefix(prompts: list[np.ndarray]) -> int:
    """The number of leading tokens all prompts have in common, leaving each at least one of its own (its last
    token's logits choose its first generated token)."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(ids) for ids in prompts) - 1
    same = np.all([ids[:shortest] == prompts[0][:shortest] for ids in prompts[1:]], axis=0)
    return int(np.argmin(same)) if not same.all() else shortest


def similar_lengths(chunks: list) -> list[list]:
    """``(fill, tokens)`` chunks in groups of similar length, each group one extend call: the fewest padded tokens
    plus ``EXTEND_CALL_TOKENS`` per call (a shortest-path over the chunks sorted by length)."""
    chunks = sorted(chunks, key=lambda chunk: chunk[1])
    best = [0] + [math.inf] * len(chunks)  # best[j]: cost of grouping the j shortest chunks
    cut = [0] * (len(chunks) + 1)
    for end in range(1, len(chunks) + 1):
        for start in range(end):  # the group chunks[start:end] pads to its longest, chunks[end - 1]
            cost = best[start] + EXTEND_CALL_TOKENS + (end - start) * chunks[end - 1][1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(chunks)
    while end:
        groups.append(chunks[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def default_cache_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.4 * torch.cuda.get_device_properties(device).total_memory)
    return 4 * 2**30


# ---------------------------------------------------------------------------------------------
# The slot cache as an FMS attention op


def _slot_cache_store(keys, values, key_cache, value_cache, **attn_kwargs):
    """Write each row's new keys/values into its slot at its positions; return the keys its queries attend to:
    ``fresh`` (a prompt from position 0: its own keys), ``leading`` (the decode step over slots ``[0, rows)``: the
    cache itself) or ``rows`` (slots continuing a sequence: their cache rows, gathered)."""
    slots, positions = attn_kwargs["slots"], attn_kwargs["write_positions"]
    key_cache[slots[:, None], :, positions] = keys  # keys: (rows, q_len, kv_heads, head_dim)
    value_cache[slots[:, None], :, positions] = values
    attend, length = attn_kwargs["attend"], attn_kwargs["attend_len"]
    if attend == "fresh":
        return keys.transpose(1, 2), values.transpose(1, 2), key_cache, value_cache
    if attend == "leading":
        rows = keys.shape[0]
        return key_cache[:rows, :, :length], value_cache[:rows, :, :length], key_cache, value_cache
    return key_cache[slots, :, :length], value_cache[slots, :, :length], key_cache, value_cache


def _grouped_attention(query, keys, values, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    """SDPA with the boolean ``mask`` (rows, q_len, kv_len); grouped-query heads share K/V without copying them."""
    query, mask = query.transpose(1, 2), attn_kwargs["mask"][:, None]
    if _fp32_scores(query, attn_kwargs["attend"]):
        out = _attention_with_fp32_scores(query, keys, values, mask, scale_factor)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale_factor,
                                             enable_gqa=nheads != kvheads)
    return out.transpose(1, 2).contiguous()


def _fp32_scores(query, attend: str) -> bool:
    """A decode step (``attend == "leading"``) of a bf16/fp16 model on the CPU: PyTorch's CPU SDPA kernel takes ~7x
    longer there than fp32 matmuls over the same cache (4.9 against 0.7 ms per layer, 8 rows of 1,536 positions),
    and is less exact. Chosen by the step, not by the number of queries, which is dynamic in compiled extend graphs:
    a test of it would put a guard in them, which recompiles past it (and which took Dynamo's shape analysis over
    half an hour to trace on the 256M shape)."""
    return half_precision_on_cpu(query) and attend == "leading"


def _attention_with_fp32_scores(query, keys, values, mask, scale_factor):
    """Attention with scores, softmax and the weighted sum in fp32: ``query`` (rows, heads, q, d), ``keys`` and
    ``values`` (rows, kv_heads, n, d), the boolean ``mask`` (rows, 1, q, n). Query head ``h`` reads kv head
    ``h // groups``, as SDPA's ``enable_gqa``."""
    rows, heads, queries, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    scale = scale_factor if scale_factor is not None else dim**-0.5
    grouped = query.reshape(rows, kv_heads, groups * queries, dim).float()
    scores = (grouped @ keys.float().transpose(-1, -2)) * scale
    mask = mask[:, :, None].expand(rows, 1, groups, queries, length).reshape(rows, 1, groups * queries, length)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights @ values.float()).to(query.dtype).reshape(rows, heads, queries, dim)


register_attention_op(ATTN_NAME, _slot_cache_store, _grouped_attention)


class SlotCache:
    """Per-layer K/V of shape ``(slots, kv_heads, length, head_dim)``; position ``length - 1`` is every slot's
    scratch: steps of slots that are not decoding, and the padding of extend batches, write there."""

    def __init__(self, model: SmolVLM, slots: int, length: int):
        text = model.config.text_config
        self.shape = (slots, text.kvheads or text.nheads, length, text.emb_dim // text.nheads)
        # zeros, not empty: masked keys get weight 0, and 0 * NaN would still be NaN
        zeros = lambda: torch.zeros(self.shape, dtype=model.dtype, device=model.device)  # noqa: E731
        self.layers = [(zeros(), zeros()) for _ in range(text.nlayers)]
        for key, value in self.layers:
            torch._dynamo.mark_static_address(key)  # lets CUDA graphs use the cache in place
            torch._dynamo.mark_static_address(value)

    @property
    def length(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(key.nbytes + value.nbytes for key, value in self.layers)

    @staticmethod
    def bytes_for(model: SmolVLM, slots: int, length: int) -> int:
        text = model.config.text_config
        per_layer = slots * (text.kvheads or text.nheads) * length * (text.emb_dim // text.nheads)
        return 2 * text.nlayers * per_layer * model.dtype.itemsize

    def grown(self, model: SmolVLM, length: int) -> "SlotCache":
        """A longer cache holding this one's contents."""
        bigger = SlotCache(model, self.shape[0], length)
        for (key, value), (new_key, new_value) in zip(self.layers, bigger.layers):
            new_key[:, :, : self.length - 1] = key[:, :, : self.length - 1]
            new_value[:, :, : self.length - 1] = value[:, :, : self.length - 1]
        return bigger

    def copy_prefix(self, source: int, targets: Sequence[int], length: int) -> None:
        """Slot ``source``'s first ``length`` positions into the slots ``targets`` (a prefix its prompts share)."""
        for key, value in self.layers:
            for target in targets:
                key[target, :, :length] = key[source, :, :length]
                value[target, :, :length] = value[source, :, :length]

    def move(self, source: int, target: int, length: int) -> None:
        for key, value in self.layers:
            key[target, :, :length] = key[source, :, :length]
            value[target, :, :length] = value[source, :, :length]


def encode_tiles(model: SmolVLM, tiles):
    """uint8 tiles ``(tiles, 3, M, M)`` -> the vision tower's text-space features (the engine's vision step)."""
    return model.image_features(tiles)


def extend(model: SmolVLM, ids, features, positions, slots, attend: str, attend_len: int, last, cache_layers):
    """Write ``ids`` (rows, n) at ``positions`` of ``slots`` and return the logits at each row's index ``last``."""
    embeds = model.embed(ids, features)
    keys = torch.arange(attend_len, device=ids.device)
    mask = keys[None, None, :] <= positions[:, :, None]
    hidden, _ = model.decode(
        embeds,
        positions,
        cache_layers,
        use_cache=True,
        attn_name=ATTN_NAME,
        mask=mask,
        slots=slots,
        write_positions=positions,
        attend=attend,
        attend_len=attend_len,
    )
    return model.language_model.head(hidden[torch.arange(ids.shape[0], device=ids.device), last])


def decode_step(model: SmolVLM, tokens, lengths, active, sampling: Optional["RowSampling"], rows: int, attend_len: int, cache_layers):
    """One token for each slot of ``[0, rows)``; returns them ``(rows,)``. The slot state (``tokens``, ``lengths``,
    ``active``, ``sampling``: whole tensors, one entry per slot, at fixed addresses, so that CUDA graphs may update
    them) advances in place: each slot's next input token, and the length and sampling step of the decoding ones.
    The host does nothing between two steps."""
    tokens, lengths, active = tokens[:rows], lengths[:rows], active[:rows]
    positions = lengths[:, None]
    keys = torch.arange(attend_len, device=tokens.device)
    hidden, _ = model.decode(
        model.language_model.base_model.embedding(tokens[:, None]),
        positions,
        cache_layers,
        use_cache=True,
        attn_name=ATTN_NAME,
        mask=keys[None, None, :] <= positions[:, :, None],
        slots=torch.arange(rows, device=tokens.device),
        write_positions=positions,
        attend="leading",
        attend_len=attend_len,
    )
    sampling = None if sampling is None else sampling.rows(rows)
    chosen = choose_tokens(model.language_model.head(hidden[:, -1]), sampling)
    tokens.copy_(chosen)
    lengths.add_(active)
    if sampling is not None:
        sampling.steps.add_(active)
    return chosen


def _rows(n: int) -> str:
    return "one" if n == 1 else "many"  # a size of 1 is never a dynamic size: a graph of its own


def _vision_variant(model, tiles) -> str:
    return _rows(tiles.shape[0])


def _vision_dynamic_dims(model, tiles) -> list:
    return [(tiles, 0)] if tiles.shape[0] > 1 else []  # the tile count; the tile's own size stays static


def _extend_variant(model, ids, features, positions, slots, attend, attend_len, last, cache_layers) -> str:
    return f"{attend}-{_rows(ids.shape[0])}"


def _decode_variant(model, tokens, lengths, active, sampling, rows, attend_len, cache_layers) -> str:
    return f"{'greedy' if sampling is None else 'sample'}-{_rows(rows)}"


def compiled_steps(model: SmolVLM, cache: Optional[Path], slots: int) -> CompiledSteps:
    """The engine's three steps compiled ahead of time, one graph per variant: the vision tower over one tile or
    several; ``extend`` per attention mode over one row or several; the decode step greedy or sampling, over one
    row or several (CUDA graphs on a GPU, captured per shape by the warm-up). Every other size is dynamic, the
    number of slots included, except one slot (a size of 1 is static): an engine of one slot has graphs of its own,
    so its artifact is keyed apart."""
    if not hasattr(torch.compiler, "load_compiled_function"):  # pyproject admits torch 2.5 for eager engines
        raise RuntimeError(f"compile=True needs torch's ahead-of-time compile (torch 2.13 is tested); this is torch {torch.__version__}")
    options = inference_compile_options(model.device)
    decode = {"mode": "reduce-overhead"} if model.device.type == "cuda" else {"options": options}
    steps = [
        CompiledStep("vision", encode_tiles, _vision_variant, dynamic_dims=_vision_dynamic_dims, options=options),
        CompiledStep("extend", extend, _extend_variant, dynamic=True, options=options),
        CompiledStep("decode", decode_step, _decode_variant, dynamic=True, **decode),
    ]
    limits = {"slots": "one" if slots == 1 else "several"}
    key = artifact_key(model.config, model.dtype, model.device, {"steps": options, "decode": decode, **limits})
    return CompiledSteps(steps, key, cache)


# ---------------------------------------------------------------------------------------------
# Sampling


class TooLongForModel(ValueError):
    """A request whose prompt plus its new tokens overruns the model's positions."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class RowSampling:
    """Per-row sampling settings as tensors ``(rows,)``: rows that do not sample take the argmax."""

    do_sample: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor  # tokens each row has generated: the counter of its random stream

    def rows(self, stop: int) -> "RowSampling":
        return RowSampling(*(getattr(self, f)[:stop] for f in self.__dataclass_fields__))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) in int64 arithmetic; identical on every device."""
    mask = 0xFFFFFFFF
    x = x & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``(rows, vocab)`` from (row seed, row step, token): a row's draws depend on its own
    seed only, not on which batch, slot or replica it runs in, so sampled captions are reproducible."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = _hash32(_hash32(_hash32(token[None, :] + steps[:, None] * 0x9E3779B9) ^ seeds[:, None]) + (seeds[:, None] >> 32))
    return (x.double() + 0.5) / 2.0**32


def choose_tokens(logits: torch.Tensor, sampling: Optional[RowSampling]) -> torch.Tensor:
    """Greedy argmax, or (rows with ``do_sample``) temperature, top-k, then top-p on what is left, drawn by an
    exponential race (``argmax(p / E)``, ``E ~ Exp(1)``) with the rows' counter-based noise."""
    greedy = logits.argmax(-1)
    if sampling is None:
        return greedy
    s = sampling
    sorted_logits, order = torch.sort(logits.float() / s.temperature[:, None], dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill((s.top_k[:, None] > 0) & (rank[None, :] >= s.top_k[:, None]), -math.inf)
    probs = sorted_logits.softmax(-1)
    # drop a token once the tokens ranked above it already cover top_p (the first always stays)
    probs = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= s.top_p[:, None], -math.inf).softmax(-1).double()
    noise = counter_uniform(s.seeds, s.steps, logits.shape[-1]).gather(1, order)  # each token's own draw
    sampled = order.gather(1, (probs / -torch.log(noise)).argmax(-1, keepdim=True))[:, 0]
    return torch.where(s.do_sample, sampled, greedy)


# ---------------------------------------------------------------------------------------------
# Requests and results


@dataclass
class Request:
    """One image (or none) and its prompts, each prompt's ids with the image expanded to its tiles' tokens.

    Several prompts share the image's work: the vision tower runs once, and their common token prefix (the
    template's start and the image) is written into the cache once and copied into each prompt's slot. Prompt
    ``j`` samples with the seed ``seed + (j << 32)``.
    """

    prompt_ids: Sequence[np.ndarray]  # int64 (seq,) per prompt
    # uint8 (tiles, 3, M, M), in the order of the prompt's images: a numpy array, or a tensor already on the engine's
    # device (a caller that copies while the engine decodes); or a SourceImage, which the engine resizes and tiles
    tiles: Union[np.ndarray, torch.Tensor, SourceImage, None] = None
    params: Sequence[SamplingParams] = (SamplingParams(),)  # per prompt
    seed: int = 0


# a common prefix shorter than this is not worth a copy: the prompts are then written separately
MIN_SHARED_PREFIX = 16


@dataclass
class Generation:
    token_ids: list  # generated ids, stop token excluded
    finish_reason: str  # "stop" | "length"


@dataclass
class _Sequence:
    """One prompt of a request, from its first cache write to its last token."""

    ticket: int
    params: SamplingParams
    seed: int
    prompt_len: int
    slot: int = -1
    length: int = 0  # tokens in its cache row
    generated: list = field(default_factory=list)


@dataclass
class _Images:
    """A request's tiles, and the vision tower's features for them once it has run (shared by its prompts)."""

    tiles: Union[np.ndarray, torch.Tensor, SourceImage]
    features: Optional[torch.Tensor] = None


@dataclass
class _Fill:
    """Tokens still to write into one slot's cache row: a prompt before it decodes, or the prefix its request's
    prompts share (then ``followers`` continue it in their own slots once it is written, this one's included)."""

    sequence: _Sequence
    ids: np.ndarray
    images: Optional[_Images]
    written: int = 0
    followers: list = field(default_factory=list)


@dataclass
class _Ticket:
    sequences: list
    fills: list  # what to write, the first first; all of it gets slots together
    done: int = 0


class GenerationEngine:
    def __init__(
        self,
        model: SmolVLM,
        stop_ids: Sequence[int],
        pad_id: int,
        max_batch_size: int = 32,
        compile: bool = False,
        cache_budget_bytes: Optional[int] = None,
        sync_every: int = 4,
        prefill_chunk: int = 2048,
        max_prefill_tokens: int = 8192,
        max_vision_tiles: int = 128,
        compile_cache: Optional[Path] = None,
    ):
        """``max_batch_size`` slots decode together. Every ``sync_every`` decode steps the host looks at the new
        tokens and fills freed slots; a prompt is written in chunks of at most ``prefill_chunk`` tokens and one
        extend step writes at most ``max_prefill_tokens`` (padding included), so a decode step never waits long; the
        vision tower sees at most ``max_vision_tiles`` tiles per call (an image with more is encoded alone).
        ``cache_budget_bytes``: the largest KV cache to allocate (default: 40% of the GPU's memory, 4 GiB on the CPU).

        ``compile``: the vision, extend and decode steps run as graphs compiled ahead of time (:mod:`fms_smolvlm.compiled`):
        loaded here from ``compile_cache`` (a folder) when an earlier engine saved them there, else compiled by
        :meth:`warmup` (which walks every one and saves them there) or, without a warm-up, as each is first needed
        (None: nothing is loaded or saved)."""
        self.model = model.eval()
        self.device = model.device
        self.stop_ids = sorted(set(stop_ids))
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.batch_buckets = batch_buckets(max_batch_size)
        self.sync_every = sync_every
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max(max_prefill_tokens, prefill_chunk)
        self.max_vision_tiles = max_vision_tiles
        self.cache_budget_bytes = cache_budget_bytes or default_cache_budget(self.device)
        # positions RoPE has a table for; a sequence also needs a window's overshoot and the scratch position
        self.rope_positions = model.config.text_config.max_expected_seq_len
        self.max_positions = min(self.rope_positions, LENGTH_BUCKETS[-1]) - sync_every - 1
        self.cache: Optional[SlotCache] = None
        self.compiled: Optional[CompiledSteps] = compiled_steps(model, compile_cache, max_batch_size) if compile else None
        if self.compiled is not None:
            self.compiled.load()  # graphs an earlier engine saved: seconds, against minutes to compile them
        self._vision, self._extend, self._decode = (
            (encode_tiles, extend, decode_step) if self.compiled is None else self.compiled.steps.values()
        )
        # a compiled extend always gets features, at least two rows: None, or one row, would be graphs of their own
        self._no_features = torch.zeros(2, model.config.text_config.emb_dim, dtype=model.dtype, device=self.device)
        self._waiting: deque = deque()  # tickets not yet given slots
        self._filling: list = []  # fills holding a slot, part written
        self._slots: list = [None] * max_batch_size  # slot -> its _Sequence
        self._tickets: dict = {}
        self._next_ticket = 0
        self._state = _SlotState(max_batch_size, sync_every, self.device)
        self._counts = {
            "requests": 0,
            "decode_steps": 0,
            "extend_calls": 0,
            "vision_calls": 0,
            "vision_tiles": 0,  # tiles through the vision tower: each request's once, whatever its prompts
            "shared_prefix_tokens": 0,  # tokens written once for several prompts (and copied, not recomputed)
        }
        self._decode_shapes: set = set()

    # --- the public API ------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raises ValueError, naming why, for a request this engine cannot run: :class:`TooLongForModel` (a prompt
        and its new tokens overrun the model's positions: a property of that request's image and prompt), more
        prompts than slots, parameters that do not match its prompts (the caller's set-up)."""
        if len(request.prompt_ids) != len(request.params) or not request.prompt_ids:
            raise ValueError(f"a request needs one SamplingParams per prompt, got {len(request.params)} for "
                             f"{len(request.prompt_ids)}")
        if len(request.prompt_ids) > self.max_batch_size:  # its prompts decode side by side, one slot each
            raise ValueError(f"a request of {len(request.prompt_ids)} prompts needs as many slots; the engine has "
                             f"{self.max_batch_size}")
        for ids, params in zip(request.prompt_ids, request.params):
            if len(ids) + params.max_new_tokens > self.max_positions:
                raise TooLongForModel(f"a prompt of {len(ids)} tokens plus {params.max_new_tokens} new tokens exceeds the "
                                 f"model's {self.max_positions} positions")

    def submit(self, request: Request) -> int:
        """Queue a request; its ticket comes back from :meth:`step` with one generation per prompt. Raises
        ValueError (and queues nothing) for a request that cannot fit the model (:meth:`check`)."""
        self.check(request)
        prompts = [np.asarray(ids, dtype=np.int64) for ids in request.prompt_ids]
        ticket = self._next_ticket
        self._next_ticket += 1
        sequences = [
            _Sequence(ticket, params, request.seed + (j << 32), len(ids)) for j, (ids, params) in enumerate(zip(prompts, request.params))
        ]
        images = _Images(request.tiles) if request.tiles is not None and len(request.tiles) else None
        fills = [_Fill(sequence, ids, images) for sequence, ids in zip(sequences, prompts)]
        shared = shared_prefix(prompts)
        if shared >= MIN_SHARED_PREFIX:  # write the prefix once, in the first prompt's slot; the others copy it
            for fill in fills:
                fill.written = shared
            fills = [_Fill(sequences[0], prompts[0][:shared], images, followers=fills)]
        self._tickets[ticket] = _Ticket(sequences, fills)
        self._waiting.append(ticket)
        self._counts["requests"] += 1
        return ticket

    def has_work(self) -> bool:
        return bool(self._tickets)

    @torch.no_grad()  # not inference mode: tensors made in it would not pass the compiled graphs' guards
    def step(self) -> list[tuple[int, list[Generation]]]:
        """One scheduling round: fill free slots (bounded prefill work), decode ``sync_every`` tokens in every
        decoding slot, retire what finished. Returns the tickets completed in this round."""
        finished = self._admit()
        if self._state.decoding_slots:
            self._decode_window()
            finished += self._retire()
        self._compact()
        return [(ticket, self._complete(ticket)) for ticket in finished if ticket is not None]

    def generate(self, requests: Sequence[Request]) -> list[list[Generation]]:
        """Every request's generations, in order (one per prompt). Requests stream through the slots."""
        tickets = [self.submit(request) for request in requests]
        results: dict = {}
        while len(results) < len(tickets):
            results.update(self.step())
        return [results[ticket] for ticket in tickets]

    def warmup(self, sampling: bool = False, max_positions: Optional[int] = None) -> dict:
        """Ready every compiled graph before the first request, so that none compiles while serving: run each step
        once in every variant, compiling the graphs the engine did not load (and saving them to ``compile_cache`` as
        the artifact, when it loaded none): the vision step over one tile and over several, ``extend`` in both
        attention modes over one row and over several, the decode step at every rows bucket, greedy, and sampling too
        with ``sampling``. On a GPU the decode step also runs at every cache length up to ``max_positions``
        (default: the model's), which captures its CUDA graphs here. Returns what it did (graphs loaded and
        compiled, seconds, the artifact's folder); an eager engine has nothing to warm up."""
        if self.compiled is None:
            return {}
        started = time.perf_counter()
        if self.compiled.loaded == 0 and self.compiled.compiled == 0:
            self.compiled.begin_artifact()  # nothing saved to load: what the warm-up compiles becomes the artifact
        on_gpu = self.device.type == "cuda"
        self._ensure_cache(min(max_positions or self.max_positions, self.max_positions) if on_gpu else LENGTH_BUCKETS[1])
        lengths = [n for n in LENGTH_BUCKETS if n < self.cache.length - 1] + [self.cache.length - 1]
        calls = self._warmup_calls(sampling, cache_lengths=lengths if on_gpu else lengths[:1])
        with torch.no_grad():
            for name, call in calls:
                step_started = time.perf_counter()
                for _ in range(3 if on_gpu else 1):  # CUDA graph trees: a warm-up run, the capture, a replay
                    call()
                logger.debug("warm-up: %s (%.2f s)", name, time.perf_counter() - step_started)
        artifact = self.compiled.save()
        self.compiled.seal()
        report = {
            "graphs_loaded": self.compiled.loaded,
            "graphs_compiled": self.compiled.compiled,
            "calls": len(calls),
            "seconds": round(time.perf_counter() - started, 2),
            "artifact": None if artifact is None else str(artifact),
        }
        logger.info("warm-up done in %.1f s: %d graphs loaded, %d compiled, %d shapes run%s", report["seconds"],
                    report["graphs_loaded"], report["graphs_compiled"], len(calls),
                    f" (artifact {artifact})" if artifact else "")
        return report

    def _warmup_calls(self, sampling: bool, cache_lengths: Sequence[int]) -> list[tuple[str, Callable]]:
        """Every variant of every step, on inputs that touch only the cache's scratch position (no slot decodes)."""
        model, cache, device = self.model, self.cache, self.device
        side = model.config.vision_config.image_size
        calls = [
            (f"vision, {n} tiles", lambda n=n: self._vision(model, torch.zeros(n, 3, side, side, dtype=torch.uint8, device=device)))
            for n in (1, 2)
        ]
        scratch = cache.length - 1
        for attend in ("fresh", "rows"):
            for rows in [n for n in (1, 2) if n <= self.max_batch_size]:  # extend never holds more rows than slots
                ids = torch.full((rows, PAD_MULTIPLE), self.pad_id, device=device)
                positions = torch.full((rows, PAD_MULTIPLE), scratch, device=device)
                attend_len = PAD_MULTIPLE if attend == "fresh" else cache_lengths[0]
                args = (model, ids, self._no_features, positions, torch.arange(rows, device=device), attend, attend_len,
                        torch.zeros(rows, dtype=torch.int64, device=device), cache.layers)
                calls.append((f"extend ({attend}), {rows} rows", lambda args=args: self._extend(*args)))
        state = self._state
        for row_sampling in [None] + ([state.sampling] if sampling else []):
            for rows in self.batch_buckets:
                for length in cache_lengths:
                    args = (model, state.tokens, state.lengths, state.active, row_sampling, rows, length, cache.layers)
                    kind = "greedy" if row_sampling is None else "sampling"
                    calls.append((f"decode ({kind}), {rows} rows, {length} positions", lambda args=args: self._decode(*args)))
        return calls

    def stats(self) -> dict:
        """Cache and compile statistics: graphs compiled and loaded (None: eager), the KV cache's shape and size, the
        decode shapes used (on a GPU, each its CUDA graph), and counts of requests, decode steps, extend and vision
        calls, tiles seen by the vision tower and prompt tokens shared."""
        return {
            "compiled_graphs": None if self.compiled is None else self.compiled.compiled,
            "loaded_graphs": None if self.compiled is None else self.compiled.loaded,
            "cache_shape": None if self.cache is None else self.cache.shape,
            "cache_bytes": 0 if self.cache is None else self.cache.nbytes,
            "decode_shapes": sorted(self._decode_shapes),
            **self._counts,
        }

    # --- scheduling --------------------------------------------------------------------------

    def _free_slots(self) -> list[int]:
        return [slot for slot, sequence in enumerate(self._slots) if sequence is None]

    def _admit(self) -> list[int]:
        """Give waiting requests free slots (all their prompts' at once, in arrival order), then write one chunk of
        every fill (within the prefill budget)."""
        free = self._free_slots()
        while self._waiting and len(self._tickets[self._waiting[0]].sequences) <= len(free):
            ticket = self._tickets[self._waiting.popleft()]
            for sequence in ticket.sequences:
                sequence.slot = free.pop(0)
                self._slots[sequence.slot] = sequence
            self._ensure_cache(max(s.prompt_len + s.params.max_new_tokens for s in ticket.sequences))
            self._filling += ticket.fills
        if not self._filling:
            return []
        chunks = self._next_chunks()
        self._encode_images([fill for fill, _ in chunks])
        fresh = [(fill, n) for fill, n in chunks if fill.written == 0]  # from position 0: attend to themselves
        continuing = [(fill, n) for fill, n in chunks if fill.written > 0]
        finished = []
        for chunks, attend in ((fresh, "fresh"), (continuing, "rows")):
            for batch in similar_lengths(chunks):
                finished += self._write_chunks(batch, attend)
        return finished

    def _next_chunks(self) -> list[tuple["_Fill", int]]:
        """``(fill, tokens)`` to write this round: one chunk per fill, in arrival order, within the budget."""
        chunks, budget = [], self.max_prefill_tokens
        for fill in self._filling:
            n = min(len(fill.ids) - fill.written, self.prefill_chunk)
            if chunks and n > budget:
                break
            chunks.append((fill, n))
            budget -= n
        return chunks

    def _encode_images(self, fills: list["_Fill"]) -> None:
        """The vision tower once for every new image of this round, in calls of at most ``max_vision_tiles`` tiles
        (a 64-frame video and its neighbours' 5-tile images are not one activation peak)."""
        pending = list({id(f.images): f.images for f in fills if f.images is not None and f.images.features is None}.values())
        group, tiles = [], 0
        for images in pending:
            if group and tiles + len(images.tiles) > self.max_vision_tiles:
                self._encode_group(group)
                group, tiles = [], 0
            group.append(images)
            tiles += len(images.tiles)
        if group:
            self._encode_group(group)

    def _encode_group(self, group: list["_Images"]) -> None:
        tiles = self._device_tiles([images.tiles for images in group])
        features = self._vision(self.model, tiles)
        self._counts["vision_calls"] += 1
        self._counts["vision_tiles"] += tiles.shape[0]
        per_tile = features.shape[0] // tiles.shape[0]
        offsets = np.cumsum([0] + [len(images.tiles) * per_tile for images in group])
        for images, start, stop in zip(group, offsets[:-1], offsets[1:]):
            images.features = features[start:stop]

    def _device_tiles(self, parts: list) -> torch.Tensor:
        """The parts' tiles, concatenated on the device: uint8 arrays copied there, tensors already there, and
        source images resized and tiled there (batched by plan)."""
        if all(isinstance(part, np.ndarray) for part in parts):
            # one copy into a fresh array: the job's tiles are views of Arrow's read-only buffers, which torch would
            # wrap with a warning (printed on the caller's console by every Ray replica)
            return torch.from_numpy(np.concatenate(parts)).to(self.device)
        sources = [part for part in parts if isinstance(part, SourceImage)]
        tiled = iter(tiles_from_sources(sources, self.device))
        return torch.cat([
            next(tiled) if isinstance(part, SourceImage)
            else torch.from_numpy(np.array(part)).to(self.device) if isinstance(part, np.ndarray)
            else part.to(self.device)
            for part in parts
        ])

    def _write_chunks(self, batch: list[tuple["_Fill", int]], attend: str) -> list[int]:
        """One extend call for these chunks; fills that complete get their first token and start decoding."""
        scratch = self.cache.length - 1
        width = -(-max(n for _, n in batch) // PAD_MULTIPLE) * PAD_MULTIPLE
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        positions = np.full((len(batch), width), scratch, dtype=np.int64)
        features = []
        for row, (fill, n) in enumerate(batch):
            chunk = fill.ids[fill.written : fill.written + n]
            ids[row, :n] = chunk
            positions[row, :n] = np.arange(fill.written, fill.written + n)
            count = int((chunk == self.model.config.image_token_id).sum())
            if count:  # this chunk's share of the request's image features, in order
                before = int((fill.ids[: fill.written] == self.model.config.image_token_id).sum())
                features.append(fill.images.features[before : before + count])
        attend_len = width if attend == "fresh" else self._attended(max(f.written + n for f, n in batch))
        last = torch.tensor([n - 1 for _, n in batch], device=self.device)
        logits = self._extend(
            self.model,
            torch.from_numpy(ids).to(self.device),
            self._chunk_features(features),
            torch.from_numpy(positions).to(self.device),
            torch.tensor([fill.sequence.slot for fill, _ in batch], device=self.device),
            attend,
            attend_len,
            last,
            self.cache.layers,
        )
        self._counts["extend_calls"] += 1
        for fill, n in batch:
            fill.written += n
        done = [row for row, (fill, _) in enumerate(batch) if fill.written == len(fill.ids)]
        completed = [batch[row][0] for row in done]
        self._filling = [fill for fill in self._filling if fill not in completed]
        prompts = [(row, fill) for row, fill in zip(done, completed) if not fill.followers]
        for prefix in (fill for fill in completed if fill.followers):  # its prompts continue it in their slots
            others = [f.sequence.slot for f in prefix.followers if f.sequence.slot != prefix.sequence.slot]
            self.cache.copy_prefix(prefix.sequence.slot, others, len(prefix.ids))
            self._counts["shared_prefix_tokens"] += len(prefix.ids)
            self._filling += prefix.followers
        if not prompts:
            return []
        sequences = [fill.sequence for _, fill in prompts]
        sampling = _row_sampling(sequences, self.device, [0] * len(sequences)) if _samples(sequences) else None
        first = choose_tokens(logits[[row for row, _ in prompts]], sampling)
        return self._start_decoding([fill for _, fill in prompts], first.tolist())

    def _chunk_features(self, features: list) -> Optional[torch.Tensor]:
        if self.compiled is None:
            return torch.cat(features) if features else None
        return torch.cat(features + [self._no_features])  # the rows past the image tokens are never read

    def _start_decoding(self, fills: list["_Fill"], first_tokens: list[int]) -> list[int]:
        """Record each sequence's first token; those not already finished decode from the next window on."""
        finished, starting = [], []
        for fill, token in zip(fills, first_tokens):
            sequence = fill.sequence
            sequence.length = sequence.prompt_len
            sequence.generated.append(token)
            if self._finished(sequence):
                finished.append(self._release(sequence))
            else:
                starting.append(sequence)
        if starting:
            self._state.activate(starting, _row_sampling(starting, self.device, [len(s.generated) for s in starting]))
        return finished

    def _decode_window(self) -> None:
        state = self._state
        rows = self._decode_rows()
        longest = max(self._slots[slot].length for slot in state.decoding_slots)
        attend_len = self._attended(longest + self.sync_every)
        self._decode_shapes.add((rows, attend_len))
        sampling = state.sampling if state.any_sampling else None
        for step in range(self.sync_every):
            state.history[:rows, step] = self._decode(
                self.model, state.tokens, state.lengths, state.active, sampling, rows, attend_len, self.cache.layers
            )
        self._counts["decode_steps"] += self.sync_every

    def _attended(self, needed: int) -> int:
        """Cache positions a step attends to: ``needed`` rounded up to a bucket, but never the whole cache (its last
        position is the scratch one, which no sequence uses): a graph that slices all of the cache is another graph
        than one that slices a part (the slice's strides differ), which the warm-up would not have met."""
        return min(round_up(needed, LENGTH_BUCKETS), self.cache.length - 1)

    def _decode_rows(self) -> int:
        """The decode step runs over slots ``[0, rows)``: up to the highest decoding slot, rounded up to a bucket."""
        return round_up(self._state.highest_decoding_slot + 1, self.batch_buckets)

    def _retire(self) -> list[int]:
        """Read the window's tokens once; hand back the sequences that stopped or reached their limit."""
        history = self._state.history[: self._decode_rows()].tolist()
        finished = []
        for slot in list(self._state.decoding_slots):
            sequence = self._slots[slot]
            sequence.generated += history[slot]
            sequence.length += self.sync_every
            if self._finished(sequence):
                finished.append(self._release(sequence))
        return finished

    def _finished(self, sequence: _Sequence) -> bool:
        if not sequence.params.ignore_eos and any(t in self.stop_ids for t in sequence.generated):
            return True
        return len(sequence.generated) >= sequence.params.max_new_tokens

    def _release(self, sequence: _Sequence) -> Optional[int]:
        """Free the sequence's slot; its ticket when that was the ticket's last sequence."""
        self._state.deactivate(sequence.slot, self.cache.length - 1)
        self._slots[sequence.slot] = None
        ticket = self._tickets[sequence.ticket]
        ticket.done += 1
        return sequence.ticket if ticket.done == len(ticket.sequences) else None

    def _complete(self, ticket: int) -> list[Generation]:
        return [self._generation(s) for s in self._tickets.pop(ticket).sequences]

    def _generation(self, sequence: _Sequence) -> Generation:
        tokens = sequence.generated[: sequence.params.max_new_tokens]
        if not sequence.params.ignore_eos:
            stop = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
            if stop is not None:
                return Generation(tokens[:stop], "stop")
        return Generation(tokens, "length")

    def _compact(self) -> None:
        """With nothing waiting, move the decoding sequences into the lowest slots when that lets a smaller
        batch bucket decode them (the tail of a run)."""
        state = self._state
        if self._waiting or self._filling or not state.decoding_slots:
            return
        needed = round_up(len(state.decoding_slots), self.batch_buckets)
        if needed >= self._decode_rows():
            return
        for slot in sorted(state.decoding_slots, reverse=True):
            target = self._free_slots()[0]
            if target >= slot:
                break
            sequence = self._slots[slot]
            self.cache.move(slot, target, sequence.length)
            state.move(slot, target, self.cache.length - 1)
            self._slots[target], self._slots[slot] = sequence, None
            sequence.slot = target

    def _ensure_cache(self, needed: int) -> None:
        """A cache long enough for ``needed`` tokens plus a window's overshoot and the scratch position."""
        length = min(round_up(needed + self.sync_every + 1, LENGTH_BUCKETS), self.rope_positions)
        if self.cache is not None and self.cache.length >= length:
            return
        size = SlotCache.bytes_for(self.model, self.max_batch_size, length)
        if size > self.cache_budget_bytes:
            raise MemoryError(
                f"a KV cache for {self.max_batch_size} slots of {length} tokens needs {size / 2**30:.1f} GiB, over "
                f"the budget of {self.cache_budget_bytes / 2**30:.1f} GiB: use a smaller batch size"
            )
        if self.cache is None:
            self.cache = SlotCache(self.model, self.max_batch_size, length)
        else:
            self.cache = self.cache.grown(self.model, length)
        self._state.move_scratch(self.cache.length - 1)


def _samples(sequences: list[_Sequence]) -> bool:
    return any(s.params.do_sample for s in sequences)


def _row_sampling(sequences: list[_Sequence], device: torch.device, steps: list[int]) -> RowSampling:
    p = [s.params for s in sequences]
    return RowSampling(
        do_sample=torch.tensor([x.do_sample for x in p], device=device),
        temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=device),
        top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=device),
        top_k=torch.tensor([x.top_k for x in p], dtype=torch.int64, device=device),
        seeds=torch.tensor([s.seed for s in sequences], dtype=torch.int64, device=device),
        steps=torch.tensor(steps, dtype=torch.int64, device=device),
    )


class _SlotState:
    """The decode loop's per-slot device state."""

    def __init__(self, slots: int, window: int, device: torch.device):
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.int64, device=device)  # next write position
        self.active = torch.zeros(slots, dtype=torch.int64, device=device)
        self.history = torch.zeros(slots, window, dtype=torch.int64, device=device)
        self.sampling = RowSampling(
            do_sample=torch.zeros(slots, dtype=torch.bool, device=device),
            temperature=torch.ones(slots, dtype=torch.float32, device=device),
            top_p=torch.ones(slots, dtype=torch.float32, device=device),
            top_k=torch.zeros(slots, dtype=torch.int64, device=device),
            seeds=torch.zeros(slots, dtype=torch.int64, device=device),
            steps=torch.zeros(slots, dtype=torch.int64, device=device),
        )
        for tensor in (self.tokens, self.lengths, self.active, *vars(self.sampling).values()):
            torch._dynamo.mark_static_address(tensor)  # the decode step updates them in place, also in a CUDA graph
        self.device = device
        self.decoding_slots: set = set()
        self.sampling_slots: set = set()

    @property
    def highest_decoding_slot(self) -> int:
        return max(self.decoding_slots)

    @property
    def any_sampling(self) -> bool:
        return bool(self.sampling_slots)

    def activate(self, sequences: list[_Sequence], sampling: RowSampling) -> None:
        """These sequences decode from the next window on: their last token, length and sampling settings."""
        slots = torch.tensor([s.slot for s in sequences], device=self.device)
        self.tokens[slots] = torch.tensor([s.generated[-1] for s in sequences], device=self.device)
        self.lengths[slots] = torch.tensor([s.length for s in sequences], device=self.device)
        self.active[slots] = 1
        for name, values in vars(sampling).items():
            getattr(self.sampling, name)[slots] = values
        self.decoding_slots.update(s.slot for s in sequences)
        self.sampling_slots.update(s.slot for s in sequences if s.params.do_sample)

    def deactivate(self, slot: int, scratch: int) -> None:
        self.active[slot] = 0
        self.lengths[slot] = scratch
        self.decoding_slots.discard(slot)
        self.sampling_slots.discard(slot)

    def move(self, source: int, target: int, scratch: int) -> None:
        for tensor in (self.tokens, self.lengths, self.active, *vars(self.sampling).values()):
            tensor[target] = tensor[source]
        was_sampling = source in self.sampling_slots
        self.deactivate(source, scratch)
        self.decoding_slots.add(target)
        if was_sampling:
            self.sampling_slots.add(target)

    def move_scratch(self, scratch: int) -> None:
        """Slots that are not decoding write their steps into the cache's last position."""
        self.lengths[self.active == 0] = scratch


# ---------------------------------------------------------------------------------------------
# The engine in a thread of its own, for callers that submit while it decodes


class BackgroundEngine:
    """Runs :meth:`GenerationEngine.step` in a thread; ``submit`` from any thread returns a ``Future`` of the
    request's generations (``asyncio.wrap_future`` makes it awaitable). A request that cannot fit fails its own
    future; an engine failure fails every pending future and the ones submitted after it.

    ``build`` makes the engine (loading and warming up its model) on that same thread, and the constructor waits
    for it: torch's OpenMP runtime gives every thread that runs parallel work a team of its own, and with two
    teams in a process that has few cores it cuts short the spin-wait between parallel regions (measured: 18%
    slower decoding on 2 cores when the model was loaded on another thread); and the CUDA graphs that
    ``torch.compile`` records are kept per thread, so the warm-up belongs on the thread that decodes."""

    def __init__(self, build: Callable[[], GenerationEngine]):
        self._inbox: queue.Queue = queue.Queue()
        self._futures: dict = {}
        self._failure: Optional[BaseException] = None
        self._closed = threading.Event()
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="generation-engine", daemon=True)
        self._thread.start()
        built.result()  # raises the build's own error; self.engine is set by then

    def submit(self, request: Request) -> Future:
        future: Future = Future()
        if self._failure is not None:
            future.set_exception(self._failure)
        else:
            self._inbox.put((request, future))
        return future

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(None)
        self._thread.join()

    def _run(self, build: Callable[[], GenerationEngine], built: Future) -> None:
        try:
            self.engine: GenerationEngine = build()
        except BaseException as error:
            built.set_exception(error)
            return
        built.set_result(self.engine)
        while not self._closed.is_set():
            try:
                self._take_submissions(block=not self.engine.has_work())
                for ticket, generations in self.engine.step() if self.engine.has_work() else []:
                    self._futures.pop(ticket).set_result(generations)
            except BaseException as error:  # the engine's state is unknown now: fail everything, accept nothing
                self._failure = error
                for future in self._futures.values():
                    future.set_exception(error)
                self._futures.clear()
                self._fail_inbox(error)
                return

    def _take_submissions(self, block: bool) -> None:
        item = self._inbox.get() if block else self._inbox.get_nowait() if not self._inbox.empty() else None
        while item is not None:
            request, future = item
            try:
                self._futures[self.engine.submit(request)] = future
            except ValueError as error:  # this request only
                future.set_exception(error)
            item = self._inbox.get_nowait() if not self._inbox.empty() else None

    def _fail_inbox(self, error: BaseException) -> None:
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if item is not None:
                item[1].set_exception(error)
