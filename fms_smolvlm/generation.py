"""Batched generation for SmolVLM: one vision pass per batch, a static KV cache, a compacting decode loop.

The hot path, in the spirit of gpt-fast:

* ``prefill``: the vision tower runs once on every real tile of the batch (flattened, no per-image
  padding); its features replace the ``<image>`` embeddings of the left-padded prompts; the text
  layers write the prompt's keys/values into a preallocated cache and return the last logits.
* ``decode_one_token``: one token per row against the whole cache, masks and positions as tensors,
  so every step of a batch has the same shapes.
* rows stop on a stop id or their own ``max_new_tokens``; every few steps the live rows are compacted
  into a smaller batch bucket, so short captions do not keep paying for the longest one.

Compiled, the vision tower and the prefill are one graph each with dynamic shapes (tile counts and
prompt lengths vary from batch to batch); the decode step has static shapes for CUDA graphs: batch
sizes and cache lengths are rounded up to a few buckets, each (batch, length) shape with its own cache
arena, allocated once and reused, so a long run compiles a bounded number of graphs. The KV cache is
plugged into FMS's attention through its attention-op registry.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fms.modules.attention import register_attention_op

from fms_smolvlm.smolvlm import SmolVLM, attention_mask_3d

ATTN_NAME = "smolvlm_static_cache"
# cache lengths: powers of two with a 1.5x step in between, so at most a third of a cache is unused
LENGTH_BUCKETS = tuple(sorted({b for k in range(5, 16) for b in (2**k, 3 * 2 ** (k - 1))}))
PROMPT_ALIGN = 8  # prompts are left-padded to a multiple of this; the prefill compiles with a dynamic length
SYNC_EVERY = 4  # decode steps between host checks for finished rows


def default_cache_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.4 * torch.cuda.get_device_properties(device).total_memory)
    return 4 * 2**30


def round_up(n: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if n <= bucket:
            return bucket
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    powers = [2**k for k in range(max_batch_size.bit_length()) if 2**k < max_batch_size]
    return tuple(powers + [max_batch_size])


# ---------------------------------------------------------------------------------------------
# The static cache as an FMS attention op


def _static_cache_store(keys, values, key_cache, value_cache, **attn_kwargs):
    """Write this step's keys/values at ``cache_position``; prefill attends to its own fresh keys only."""
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (batch, kv_heads, q_len, head_dim)
    position = attn_kwargs["cache_position"]
    key_cache.index_copy_(2, position, keys)
    value_cache.index_copy_(2, position, values)
    if attn_kwargs["prefill"]:
        return keys, values, key_cache, value_cache
    return key_cache, value_cache, key_cache, value_cache


def _grouped_attention(query, keys, values, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    """SDPA with the boolean ``mask`` (batch, q_len, kv_len); grouped-query heads share K/V without copying them."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys,
        values,
        attn_mask=attn_kwargs["mask"][:, None],
        scale=scale_factor,
        enable_gqa=nheads != kvheads,
    )
    return out.transpose(1, 2).contiguous()


register_attention_op(ATTN_NAME, _static_cache_store, _grouped_attention)


class CacheArena:
    """Per-layer K/V tensors for one ``(batch, length)`` shape, allocated once and reused by every batch of that shape."""

    def __init__(self, model: SmolVLM, batch: int, length: int):
        weight = model.language_model.base_model.embedding.weight
        shape = self.layer_shape(model, batch, length)
        self.layers = [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in range(model.config.text_config.nlayers)]
        for key, value in self.layers:
            torch._dynamo.mark_static_address(key)  # lets CUDA graphs use the cache in place
            torch._dynamo.mark_static_address(value)
        self.nbytes = self.bytes_for(model, batch, length)

    @staticmethod
    def layer_shape(model: SmolVLM, batch: int, length: int) -> tuple[int, int, int, int]:
        text = model.config.text_config
        return (batch, text.kvheads or text.nheads, length, text.emb_dim // text.nheads)

    @classmethod
    def bytes_for(cls, model: SmolVLM, batch: int, length: int) -> int:
        itemsize = model.language_model.base_model.embedding.weight.element_size()
        return 2 * model.config.text_config.nlayers * math.prod(cls.layer_shape(model, batch, length)) * itemsize

    def gather_rows_from(self, other: "CacheArena", rows: torch.Tensor) -> None:
        for (k, v), (other_k, other_v) in zip(self.layers, other.layers):
            torch.index_select(other_k, 0, rows, out=k)
            torch.index_select(other_v, 0, rows, out=v)


def prefill(model: SmolVLM, embeds, position_ids, mask, cache_position, cache_layers):
    hidden, _ = model.decode(
        embeds,
        position_ids,
        cache_layers,
        use_cache=True,
        attn_name=ATTN_NAME,
        mask=mask,
        cache_position=cache_position,
        prefill=True,
    )
    return model.language_model.head(hidden[:, -1])


def decode_one_token(model: SmolVLM, tokens, position_ids, mask, cache_position, cache_layers):
    embeds = model.language_model.base_model.embedding(tokens)
    hidden, _ = model.decode(
        embeds,
        position_ids,
        cache_layers,
        use_cache=True,
        attn_name=ATTN_NAME,
        mask=mask,
        cache_position=cache_position,
        prefill=False,
    )
    return model.language_model.head(hidden[:, -1])


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) in int64 arithmetic; identical on every device."""
    mask = 0xFFFFFFFF
    x = x & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``(rows, vocab)`` from (row seed, step, token): a row's draws depend on its own
    seed only, not on which batch or replica it runs in, so sampled captions are reproducible."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = _hash32(_hash32(_hash32(token[None, :] + step * 0x9E3779B9) ^ seeds[:, None]) + (seeds[:, None] >> 32))
    return (x.double() + 0.5) / 2.0**32


def choose_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, step: int) -> torch.Tensor:
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already cover top_p (the first always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1).double()
    # exponential race: argmax(p / E) with E ~ Exp(1) samples from p
    exponential = -torch.log(counter_uniform(seeds, step, logits.shape[-1]))
    return (probs / exponential).argmax(-1)


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class Request:
    input_ids: np.ndarray  # int64 (seq,), image placeholders expanded
    tiles: Optional[np.ndarray] = None  # uint8 (tiles, 3, M, M), in the order of the prompt's images
    max_new_tokens: Optional[int] = None  # None: the batch's SamplingParams
    seed: int = 0


@dataclass
class Generation:
    token_ids: list  # generated ids, stop token excluded
    finish_reason: str  # "stop" | "length"


@dataclass
class _Batch:
    """Device state of the rows being decoded; row ``i`` serves request ``rows[i]`` (None: filler)."""

    rows: list
    arena: CacheArena
    prompt_len: int
    positions: torch.Tensor  # (batch, 1) RoPE position of the token being fed
    key_valid: torch.Tensor  # (batch, cache_len) bool: which cache slots each row may attend to
    seeds: torch.Tensor  # (batch,) int64
    limits: torch.Tensor  # (batch,) per-row max_new_tokens
    generated: torch.Tensor  # (batch, max_new) int64
    slots: torch.Tensor  # arange(cache_len) on the device


class GenerationEngine:
    def __init__(
        self,
        model: SmolVLM,
        stop_ids: Sequence[int],
        pad_id: int,
        max_batch_size: int = 32,
        compile: bool = False,
        cache_budget_bytes: Optional[int] = None,
    ):
        """``cache_budget_bytes``: KV cache arenas kept for reuse (least recently used ones are freed beyond it);
        default: 40% of the GPU's memory, or 4 GiB on the CPU."""
        self.model = model.eval()
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.int64, device=self.device)
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.batch_buckets = batch_buckets(max_batch_size)
        self._arenas: OrderedDict[tuple[int, int], CacheArena] = OrderedDict()
        self.cache_budget_bytes = cache_budget_bytes or default_cache_budget(self.device)
        self._vision = model.image_features
        self._prefill = prefill
        self._decode = decode_one_token
        if compile:
            self._compile()

    @property
    def device(self) -> torch.device:
        return self.model.language_model.base_model.embedding.weight.device

    def _compile(self):
        # every bucketed shape is its own graph: allow all of them rather than silently falling back to eager
        limit = len(self.batch_buckets) * len(LENGTH_BUCKETS)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        # tile counts and prompt lengths vary from batch to batch: one graph each, with dynamic shapes
        self._vision = torch.compile(self.model.image_features, dynamic=True)
        self._prefill = torch.compile(prefill, dynamic=True)
        decode_mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs for the decode step
        self._decode = torch.compile(decode_one_token, dynamic=False, fullgraph=True, mode=decode_mode)

    def arena(self, batch: int, length: int, in_use: Optional[CacheArena] = None) -> CacheArena:
        """The cache arena of this shape, reused when it exists; least recently used others are freed to keep
        the budget (a freed shape's decode graph stays compiled, a new arena just takes its place)."""
        key = (batch, length)
        if key not in self._arenas:
            needed = CacheArena.bytes_for(self.model, batch, length)
            for old in [k for k, a in self._arenas.items() if a is not in_use]:
                if sum(a.nbytes for a in self._arenas.values()) + needed <= self.cache_budget_bytes:
                    break
                del self._arenas[old]
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self._arenas[key] = CacheArena(self.model, batch, length)
        self._arenas.move_to_end(key)
        return self._arenas[key]

    def check_fits(self, requests: Sequence[Request], params: SamplingParams) -> None:
        positions = self.model.config.text_config.max_expected_seq_len
        for request in requests:
            needed = len(request.input_ids) + (request.max_new_tokens or params.max_new_tokens)
            if needed > min(positions, LENGTH_BUCKETS[-1]):
                raise ValueError(
                    f"a prompt of {len(request.input_ids)} tokens plus {needed - len(request.input_ids)} new tokens "
                    f"exceeds the model's {min(positions, LENGTH_BUCKETS[-1])} positions"
                )

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Generation]:
        """One generation per request, in order. Prompts of similar length are batched together."""
        self.check_fits(requests, params)
        results: list[Optional[Generation]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            for index, generation in zip(chunk, self._generate_batch([requests[i] for i in chunk], params)):
                results[index] = generation
        return results  # type: ignore[return-value]

    def _generate_batch(self, requests: Sequence[Request], params: SamplingParams) -> list[Generation]:
        limits = [r.max_new_tokens or params.max_new_tokens for r in requests]
        max_new = max(limits)
        state, logits = self._prefill_batch(requests, limits, max_new)
        done: dict[int, Generation] = {}
        for step in range(max_new):
            state.generated[:, step] = choose_tokens(logits, params, state.seeds, step)
            if step == max_new - 1:
                break
            if (step + 1) % SYNC_EVERY == 0:
                state = self._retire_finished(state, step + 1, done)
                if state is None:
                    break
            logits = self._decode_step(state, step)
        if state is not None:
            self._collect(state, range(len(state.rows)), max_new, done)
        return [done[i] for i in range(len(requests))]

    def _prefill_batch(self, requests: Sequence[Request], limits: list[int], max_new: int):
        device = self.device
        n = len(requests)
        batch = round_up(n, self.batch_buckets)
        lengths = [len(r.input_ids) for r in requests]
        prompt_len = -(-max(lengths) // PROMPT_ALIGN) * PROMPT_ALIGN
        cache_len = round_up(prompt_len + max_new, LENGTH_BUCKETS)

        ids = np.full((batch, prompt_len), self.pad_id, dtype=np.int64)
        first = np.full(batch, prompt_len - 1)  # filler rows hold one valid pad token
        for row, request in enumerate(requests):
            first[row] = prompt_len - lengths[row]
            ids[row, first[row] :] = request.input_ids
        first_t = torch.from_numpy(first).to(device)
        slots = torch.arange(cache_len, device=device)
        key_valid = (slots[None, :] >= first_t[:, None]) & (slots[None, :] < prompt_len)
        positions = (slots[None, :prompt_len] - first_t[:, None]).clamp(min=0)
        mask = attention_mask_3d(key_valid[:, :prompt_len], prompt_len)

        ids_t = torch.from_numpy(ids).to(device)
        tiles = [r.tiles for r in requests if r.tiles is not None and len(r.tiles)]
        features = self._vision(torch.from_numpy(np.concatenate(tiles)).to(device)) if tiles else None
        embeds = self.model.embed(ids_t, features)

        arena = self.arena(batch, cache_len)
        logits = self._prefill(self.model, embeds, positions, mask, slots[:prompt_len], arena.layers)
        state = _Batch(
            rows=list(range(n)) + [None] * (batch - n),
            arena=arena,
            prompt_len=prompt_len,
            positions=positions[:, -1:] + 1,
            key_valid=key_valid,
            seeds=torch.tensor([r.seed for r in requests] + [0] * (batch - n), dtype=torch.int64, device=device),
            limits=torch.tensor(limits + [1] * (batch - n), device=device),
            generated=torch.full((batch, max_new), self.pad_id, dtype=torch.int64, device=device),
            slots=slots,
        )
        return state, logits

    def _decode_step(self, state: _Batch, step: int) -> torch.Tensor:
        write = state.prompt_len + step  # all rows write one slot: the prompts are right-aligned
        state.key_valid[:, write] = True
        logits = self._decode(
            self.model,
            state.generated[:, step : step + 1].contiguous(),  # same strides for every batch: no recompiles
            state.positions,
            state.key_valid[:, None, :],
            state.slots[write : write + 1],  # a view on the device: no host-to-device copy (and sync) per step
            state.arena.layers,
        )
        state.positions = state.positions + 1
        return logits

    def _finished_rows(self, state: _Batch, steps: int) -> list[bool]:
        stopped = torch.isin(state.generated[:, :steps], self.stop_ids).any(1)
        return (stopped | (state.limits <= steps)).tolist()

    def _retire_finished(self, state: _Batch, steps: int, done: dict) -> Optional[_Batch]:
        """Hand back finished rows; move the live ones into a smaller batch bucket when they fit one."""
        finished = self._finished_rows(state, steps)
        self._collect(state, [i for i, f in enumerate(finished) if f], steps, done)
        live = [i for i, row in enumerate(state.rows) if row is not None and not finished[i]]
        if not live:
            return None
        for i in range(len(state.rows)):
            if finished[i]:
                state.rows[i] = None
        batch = round_up(len(live), self.batch_buckets)
        if batch == len(state.rows):
            return state
        keep = torch.tensor(live + [live[0]] * (batch - len(live)), device=self.device)
        arena = self.arena(batch, state.key_valid.shape[1], in_use=state.arena)
        arena.gather_rows_from(state.arena, keep)
        return _Batch(
            rows=[state.rows[i] for i in live] + [None] * (batch - len(live)),
            arena=arena,
            prompt_len=state.prompt_len,
            positions=state.positions[keep],
            key_valid=state.key_valid[keep],
            seeds=state.seeds[keep],
            limits=state.limits[keep],
            generated=state.generated[keep],
            slots=state.slots,
        )

    def _collect(self, state: _Batch, row_indices, steps: int, done: dict) -> None:
        generated = state.generated[:, :steps].cpu().numpy()
        limits = state.limits.tolist()
        stop_ids = set(self.stop_ids.tolist())
        for i in row_indices:
            request = state.rows[i]
            if request is None or request in done:
                continue
            tokens = generated[i, : limits[i]].tolist()
            stop_at = next((j for j, token in enumerate(tokens) if token in stop_ids), None)
            if stop_at is None:
                done[request] = Generation(tokens, "length")
            else:
                done[request] = Generation(tokens[:stop_at], "stop")
