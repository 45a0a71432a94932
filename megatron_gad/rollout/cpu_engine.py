"""CPU rollout engine: a transformers causal LM updated in place from the exporter, sampled with
its own KV-cached loop (a static cache allocated once per call at its final length, eager
attention under our own additive mask; a step where rows sample EOS copies the cache's other
rows into a smaller one, so later steps compute only the rows still decoding).

Sampling per step: logits (float32, real vocab) -> divide by ``temperature`` -> keep the ``top_k``
largest -> keep the smallest set of tokens whose probability reaches ``top_p`` -> renormalise ->
sample. The returned ``rollout_log_probs`` are the log-probs of the sampled tokens under exactly
that processed (renormalised) distribution, which is what vLLM returns with
``logprobs_mode="processed_logprobs"``. With top_k/top_p disabled they equal
``log_softmax(logits / temperature)`` (what the trainer recomputes). Greedy decoding takes the
argmax and reports ``log_softmax(logits)`` (temperature 1, no filtering).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import Tensor

from megatron_gad.data.batch import position_ids_from_mask
from megatron_gad.rollout.base import (
    ModelDivergedError,
    RolloutConfig,
    RolloutEngine,
    RolloutOutput,
    TokenSpec,
    WeightBucket,
)


#: The rollout model's attention: transformers' eager (matmul, additive mask, softmax, matmul)
#: costs less than torch's CPU SDPA kernel for the one-query decode steps of small models.
_ATTN = {"attn_implementation": "eager"}


class CPURolloutEngine(RolloutEngine):
    """Rollout engine on a float32 transformers ``AutoModelForCausalLM`` (any device, CPU by default).

    Built from the actor's HF config with random weights; :meth:`load_weights` must receive every
    parameter before the first :meth:`generate`. Called on destination ranks of the exporter.
    """

    def __init__(self, cfg: RolloutConfig, hf_config: Any, tokens: TokenSpec, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        cfg.validate()
        self.cfg = cfg
        self.tokens = tokens
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, **_ATTN).to(self.device).eval()
        self.vocab_size = int(hf_config.vocab_size)
        self._params = dict(self.model.named_parameters())
        self.loaded = False
        # transformers >= 5.x calls the KV cache ``cache``; 4.x calls it ``past_key_values``.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        # the prefill needs the logits of the last prompt position only
        self._last_logits_only = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters
                                  else {})
        self._takes_cache_position = "cache_position" in inspect.signature(self.model.forward).parameters

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def load_weights(self, buckets: Iterable[WeightBucket], strict: bool = True) -> None:
        """Take each ``(hf_name, tensor)`` as the model's parameter of that name.

        A tensor of the parameter's dtype, device and shape that is contiguous becomes the
        parameter's storage (nothing is copied; a tensor of :meth:`weight_destinations`, which
        the exporter has already written, is the parameter's storage already); any other is
        copied in. The caller hands over such tensors: it must not change them unless it means
        the engine to see the change. The exporter yields, at TP=1 in the engine's dtype, views
        of the live Megatron parameters, so the engine then reads the actor's current weights,
        copying nothing. That is exactly a copy made at the sync: the trainer changes the actor
        only in its update (and on a checkpoint load), each followed by a sync before the next
        generation, and never generates between an update and that sync. A later sync rebinds
        every parameter to what it yields, so a Megatron parameter given new storage is
        followed as well.

        A load that does not complete (the exporter found a non-finite weight at the end of
        the export, a peer failed, a name or shape was refused) leaves the engine holding a mix
        of old and new weights, possibly the non-finite ones, since they were written in place:
        the engine then counts as not loaded, and :meth:`generate` refuses to run ("load_weights
        must run before generate") until a later load completes.

        Consumes ``buckets`` lazily, one bucket at a time. Raises KeyError for an unknown name,
        ValueError for a shape mismatch and, with ``strict``, ValueError listing parameters that
        no bucket provided (a tied ``lm_head.weight`` is the embedding and needs no tensor).
        """
        self.loaded = False  # until every bucket, and the exporter's finite check, went through
        seen: set[str] = set()
        for bucket in buckets:
            for name, tensor in bucket:
                param = self._params.get(name)
                if param is None:
                    raise KeyError(f"CPU rollout engine: unknown weight {name!r} (not a parameter of the HF model)")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"CPU rollout engine: weight {name!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                if tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous():
                    if tensor.data_ptr() != param.data_ptr():
                        param.data = tensor.detach()
                else:
                    param.copy_(tensor)
                seen.add(name)
            del bucket
        missing = sorted(set(self._params) - seen)
        if strict and missing:
            raise ValueError(f"CPU rollout engine: {len(missing)} weight(s) not received: {', '.join(missing[:5])}")
        self.loaded = True

    def weight_destinations(self) -> dict[str, Tensor]:
        """The model's parameters by HF name (detached, sharing their storage), for the exporter
        to write the next weights into. Before the first load they hold the random placeholder
        weights, storage the engine owns all the same, so even the first sync allocates nothing
        the engine keeps beside them. The exporter writes only into those that fit and share
        no storage with the actor's parameters (at TP=1 those are views of them and are rebound
        instead); on CPU ranks with shared memory it writes into its arena instead, and the
        first such load rebinds the parameters to it (see ``WeightExporter.buckets``). Whatever
        the exporter does not write into is rebound or copied by :meth:`load_weights`."""
        return {name: param.detach() for name, param in self._params.items()}

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, n: int | None = None,
        greedy: bool = False, seed: int | None = None,
    ) -> RolloutOutput:
        """Sample ``n`` responses per left-padded prompt ([B, P]); see the module docstring."""
        if not self.loaded:
            raise RuntimeError("CPU rollout engine: load_weights must run before generate")
        if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must be equal [B, P]")
        n = self.cfg.n if n is None else n
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed if seed is None else seed)
        used = torch.nonzero(prompt_mask.bool().any(0)).flatten()
        first = int(used[0]) if used.numel() else max(prompt_ids.shape[1] - 1, 0)
        # left-padding columns no prompt uses are masked out of attention: dropping them changes
        # no result and shortens every attention over the KV cache
        ids = prompt_ids[:, first:].to(self.device).repeat_interleave(n, dim=0)
        mask = prompt_mask[:, first:].to(self.device).long().repeat_interleave(n, dim=0)
        with torch.inference_mode():  # less bookkeeping per op than no_grad; _finish's results are plain tensors
            tokens, logps, done_at = self._decode(ids, mask, greedy, gen)
        return self._finish(tokens, logps, done_at)

    def _decode(self, ids: Tensor, mask: Tensor, greedy: bool, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The KV-cached loop. Returns tokens [N, T], log-probs [N, T], and per row the number of
        valid tokens (T where no EOS was sampled).

        The KV cache is allocated once at its final length (prompt + ``response_length``) and
        filled in place: a growing cache re-copies every key and value at every step. The
        attention mask is ours, additive 4-D (0 where a key may be attended, the float32
        minimum elsewhere): keys beyond the current token are masked, as are the prompt's left
        padding, so the result is that of attention over the keys so far. A left-padding query
        attends to itself alone (its output is never read; a row of no keys would be NaN).

        A row that samples EOS leaves the batch: its KV cache rows, mask row and position go,
        so later steps compute only the rows still decoding (each row's result is what it was
        with the finished rows kept, since rows never attend across each other; what changes
        is the random stream's order, which draws for the remaining rows only)."""
        from transformers import StaticCache

        rows, prompt, limit = ids.shape[0], ids.shape[1], self.cfg.response_length
        eos = torch.tensor(self.tokens.eos_token_ids, device=self.device)
        positions = position_ids_from_mask(mask)
        total = prompt + limit
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        keys = torch.zeros(rows, total, dtype=torch.bool, device=self.device)  # which keys exist so far
        keys[:, :prompt] = mask.bool()
        span = torch.arange(total, device=self.device)
        query = torch.arange(prompt, device=self.device)
        allowed = (span[None, :] <= query[:, None])[None] & keys[:, None, :]  # causal, valid keys [N, P, L]
        allowed |= (span[None, :] == query[:, None])[None]  # a padding query sees itself
        out = self.model(input_ids=ids, attention_mask=_additive(allowed)[:, None], position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._positions(query), **self._last_logits_only)
        logits = out.logits[:, -1, : self.vocab_size]
        next_pos = positions[:, -1:] + 1
        length = torch.full((rows,), limit, dtype=torch.long, device=self.device)
        tokens = torch.full((rows, limit), self.tokens.pad_token_id, dtype=torch.long, device=self.device)
        logps = torch.zeros(rows, limit, device=self.device)
        active = torch.arange(rows, device=self.device)  # the rows still decoding, in cache order
        step_mask = torch.full((rows, 1, 1, total), torch.finfo(torch.float32).min, device=self.device)
        step_mask[:, 0, 0, :prompt] = _additive(keys[:, :prompt])
        for step in range(limit):
            token, logp = self._sample(logits.float(), greedy, gen)
            tokens[active, step] = token
            logps[active, step] = logp.float()
            if step + 1 == limit:  # an EOS here leaves the row at its default length, ``limit``
                break
            ended = torch.isin(token, eos)
            if bool(ended.any()):
                length[active[ended]] = step + 1
                keep = torch.nonzero(~ended).flatten()
                if not keep.numel():
                    break
                active, token, next_pos, step_mask = active[keep], token[keep], next_pos[keep], step_mask[keep]
                cache.reorder_cache(keep)
            step_mask[:, 0, 0, prompt + step] = 0.0  # the new token's key
            out = self.model(input_ids=token[:, None], attention_mask=step_mask, position_ids=next_pos,
                             use_cache=True, **{self._cache_kw: cache},
                             **self._positions(torch.tensor([prompt + step], device=self.device)))
            logits = out.logits[:, -1, : self.vocab_size]
            next_pos = next_pos + 1
        return tokens, logps, length

    def _positions(self, cache_position: Tensor) -> dict[str, Tensor]:
        """``cache_position`` for transformers versions whose forward takes it (4.x: the static
        cache writes there); 5.x keeps the position in the cache itself."""
        return {"cache_position": cache_position} if self._takes_cache_position else {}

    def _sample(self, logits: Tensor, greedy: bool, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """One step: (token [N], log-prob [N]) from float32 logits [N, V]."""
        if not bool(torch.isfinite(logits).all()):
            raise ModelDivergedError("the rollout model produced inf/NaN logits: the policy has diverged "
                                     "(learning rate too high?)")
        if greedy:
            token = logits.argmax(-1)
            return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        logp = torch.log_softmax(filter_logits(logits / self.cfg.temperature, self.cfg.top_k, self.cfg.top_p), -1)
        token = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)

    def _finish(self, tokens: Tensor, logps: Tensor, length: Tensor) -> RolloutOutput:
        width = int(length.max())
        steps = torch.arange(tokens.shape[1], device=tokens.device)[None]
        valid = steps < length[:, None]
        tokens = torch.where(valid, tokens, torch.full_like(tokens, self.tokens.pad_token_id))[:, :width]
        logps = torch.where(valid, logps, torch.zeros_like(logps))[:, :width]
        return RolloutOutput(
            responses=tokens.cpu(), response_mask=valid[:, :width].long().cpu(),
            rollout_log_probs=logps.float().cpu(),
        )


def _additive(allowed: Tensor) -> Tensor:
    """An additive float32 attention mask of a boolean one (True: attend): 0, or the float32 minimum."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf ([N, V] -> [N, V]).

    ``top_k <= 0`` or ``>= V`` and ``top_p >= 1`` disable the filters. The nucleus keeps the most
    likely tokens whose cumulative probability, before adding the token, is below ``top_p`` (so at
    least one token always survives).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
