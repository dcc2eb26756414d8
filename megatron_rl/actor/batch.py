"""From RL samples to Megatron micro-batches: token balancing, packing (THD) or padding (bshd), CP split, labels.

`ActorBatch` is what the trainer hands the actor: N sequences = prompt + response, with response-aligned
per-token data (old/ref/rollout log-probs, loss mask) and one advantage per sequence (or per token).
Every rank receives the same `ActorBatch` and derives its own share deterministically:

1. `plan_microbatches`: balance sequences over DP ranks by token count (LPT), then over M micro-batches,
   where M is the same on every DP rank (expert-parallel all-to-alls and pipeline schedules run in lock-step);
   a DP rank with fewer sequences than M gets empty (dummy) micro-batches.
2. `build_microbatch`: the model input of one micro-batch on this CP rank.
   - packed: one stream [1, T] with sequences padded to a multiple of 2*cp (plus tail padding so T/cp divides
     by TP for sequence parallelism), `PackedSeqParams(qkv_format="thd")`;
   - padded: [b, S] rows right-padded to the longest (causal attention never looks at right padding).
   Position t's label is token t+1; a label counts when it is a response token. Under CP this rank keeps chunks
   r and 2*cp-1-r of every sequence, so some response tokens are computed here and the rest elsewhere.
   The loss sees a [B, R] response layout (row = sequence, column = response position) with `mask` marking the
   tokens computed on this rank (and kept by the loss mask); per-sequence sums are completed over CP inside
   the loss, which is what makes GSPO/LUSPO exact under CP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_rl.algorithms.context_parallel import split_for_cp
from megatron_rl.parallel.packing import balanced_partition, round_up, thd_cp_local_index

TOKEN_FIELDS = ("old_log_probs", "ref_log_probs", "rollout_log_probs", "token_advantages")
_RAGGED_FIELDS = ("prompt_ids", "response_ids", *TOKEN_FIELDS, "loss_mask", "routed_experts")


def pack_ragged(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of tensors of equal trailing shape (1-D per-token values, or [tokens, layers, top-k] routed experts) as
    (one tensor concatenated along dim 0, their lengths): what crosses a process boundary. Pickling a few large
    tensors costs microseconds; pickling one small tensor per sequence (thousands per batch) costs ~0.1-0.2 s per RL
    step in the quickstart (docs/benchmarks.md)."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    flat = torch.cat(rows) if rows else torch.zeros(0)
    return flat, lengths


def unpack_ragged(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """`pack_ragged` undone: views into `flat` (no copy)."""
    return list(torch.split(flat, lengths.tolist())) if lengths.numel() else []


class TensorList(list):
    """A list of 1-D tensors (one per sequence) that pickles as one flat tensor plus lengths (`pack_ragged`): the
    per-sequence log-probs the actor returns to the driver."""

    def __reduce__(self):
        return _tensor_list, pack_ragged(list(self))


def _tensor_list(flat: torch.Tensor, lengths: torch.Tensor) -> TensorList:
    return TensorList(unpack_ragged(flat, lengths))


# a TensorList holds tensors only: `torch.load(..., weights_only=True)` of a saved one may rebuild it
torch.serialization.add_safe_globals([_tensor_list])


def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D token ids, got shape {tuple(t.shape)}")
    return t


@dataclass
class ActorBatch:
    """N sequences for the actor. Per-token lists are response-aligned: field[i] has len(response_ids[i]) values."""

    prompt_ids: list[torch.Tensor]
    response_ids: list[torch.Tensor]
    advantages: torch.Tensor | None = None  # [N], one per sequence
    token_advantages: list[torch.Tensor] | None = None
    old_log_probs: list[torch.Tensor] | None = None
    ref_log_probs: list[torch.Tensor] | None = None
    rollout_log_probs: list[torch.Tensor] | None = None
    loss_mask: list[torch.Tensor] | None = None  # bool per response token; None = all tokens count
    # MoE routing replay: per sequence [prompt + response - 1, MoE layers, top-k] expert ids (uint8/int16), the
    # experts each token but the last was routed to when the sample was generated (or by the old policy)
    routed_experts: list[torch.Tensor] | None = None

    def __post_init__(self):
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError(
                f"batch.prompt_ids has {len(self.prompt_ids)} rows but batch.response_ids has {len(self.response_ids)}"
            )
        self.prompt_ids = [_as_long(p, f"batch.prompt_ids[{i}]") for i, p in enumerate(self.prompt_ids)]
        self.response_ids = [_as_long(r, f"batch.response_ids[{i}]") for i, r in enumerate(self.response_ids)]
        for i, p in enumerate(self.prompt_ids):
            if p.numel() == 0:
                raise ValueError(f"batch.prompt_ids[{i}] is empty: every sequence needs at least one prompt token")
        n = len(self)
        if self.advantages is not None:
            self.advantages = torch.as_tensor(self.advantages, dtype=torch.float32).reshape(-1)
            if self.advantages.numel() != n:
                raise ValueError(f"batch.advantages has {self.advantages.numel()} values for {n} sequences")
            if not torch.isfinite(self.advantages).all():
                raise ValueError("batch.advantages contains NaN or inf")
        for name in (*TOKEN_FIELDS, "loss_mask"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != n:
                raise ValueError(f"batch.{name} has {len(values)} rows for {n} sequences")
            dtype = torch.bool if name == "loss_mask" else torch.float32
            converted = []
            for i, (v, r) in enumerate(zip(values, self.response_ids)):
                t = torch.as_tensor(v, dtype=dtype).reshape(-1)
                if t.numel() != r.numel():
                    raise ValueError(f"batch.{name}[{i}] has {t.numel()} values for a response of {r.numel()} tokens")
                converted.append(t)
            setattr(self, name, converted)
        if self.routed_experts is not None:
            if len(self.routed_experts) != n:
                raise ValueError(f"batch.routed_experts has {len(self.routed_experts)} rows for {n} sequences")
            converted = []
            for i, (routes, p, r) in enumerate(zip(self.routed_experts, self.prompt_ids, self.response_ids)):
                t = torch.as_tensor(routes)
                if t.dim() != 3 or t.shape[0] != p.numel() + r.numel() - 1:
                    raise ValueError(f"batch.routed_experts[{i}] must be [prompt + response - 1 = "
                                     f"{p.numel() + r.numel() - 1} tokens, MoE layers, top-k], got {tuple(t.shape)}")
                converted.append(t)
            self.routed_experts = converted

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def sequence_lengths(self) -> list[int]:
        return [p.numel() + r.numel() for p, r in zip(self.prompt_ids, self.response_ids)]

    @property
    def max_response_length(self) -> int:
        return max((r.numel() for r in self.response_ids), default=0)

    def __getstate__(self) -> dict:
        """Pickle as a few flat tensors (`pack_ragged`), not one tensor per sequence and field: an ActorBatch crosses
        Ray once per actor call."""
        state = {"advantages": self.advantages}
        for name in _RAGGED_FIELDS:
            values = getattr(self, name)
            state[name] = None if values is None else pack_ragged(values)
        return state

    def __setstate__(self, state: dict) -> None:
        self.advantages = state["advantages"]
        for name in _RAGGED_FIELDS:
            packed = state[name]
            setattr(self, name, None if packed is None else unpack_ragged(*packed))

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this step needs batch fields {missing}; they are None")


@dataclass
class MicroBatch:
    """One micro-batch on one rank: model inputs plus the [B, R] response layout the loss sees."""

    sample_ids: list[int]
    tokens: torch.Tensor  # [1, T_local] packed or [b, S_local] padded
    positions: torch.Tensor
    labels: torch.Tensor  # same shape as tokens; valid only where label_index points
    packed_seq_params: object | None
    label_index: torch.Tensor  # [n] flat positions in tokens.view(-1) whose label is a response token held here
    rows: torch.Tensor  # [n] row of each such label in sample_ids
    cols: torch.Tensor  # [n] its response-token index
    mask: torch.Tensor  # [B, R] bool: computed here and kept by the loss mask
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, R] per TOKEN_FIELDS present
    advantages: torch.Tensor | None = None  # [B]
    num_model_tokens: int = 0  # tokens this rank runs through the model (incl. padding)
    token_rows: torch.Tensor | None = None  # same shape as tokens: the row in sample_ids of each token, -1 = padding

    @property
    def num_rows(self) -> int:
        return len(self.sample_ids)


def plan_microbatches(
    lengths: list[int], dp_size: int, max_tokens_per_microbatch: int, *, multiple_of: int = 1
) -> list[list[list[int]]]:
    """plan[dp_rank][microbatch] = sorted sample ids. Same number of micro-batches on every DP rank."""
    per_rank = balanced_partition(lengths, dp_size)
    loads = [sum(lengths[i] for i in ids) for ids in per_rank]
    num_mb = max(1, max(math.ceil(load / max_tokens_per_microbatch) for load in loads))
    num_mb = round_up(num_mb, multiple_of)
    plan = []
    for ids in per_rank:
        bins = balanced_partition([lengths[i] for i in ids], num_mb)
        plan.append([[ids[j] for j in b] for b in bins])
    return plan


def _layout_multiple(tp: int, cp: int) -> tuple[int, int]:
    """(per-sequence multiple, total multiple): each sequence splits into 2*cp chunks; the local stream
    (total / cp) must split over TP for sequence parallelism."""
    per_sequence = 2 * cp if cp > 1 else 1
    total = math.lcm(per_sequence, cp * tp)
    return per_sequence, total


def build_microbatch(
    batch: ActorBatch,
    sample_ids: list[int],
    *,
    packing: bool,
    tp: int = 1,
    cp: int = 1,
    cp_rank: int = 0,
    pad_id: int = 0,
) -> MicroBatch:
    """Model inputs and loss layout for `sample_ids` on CP rank `cp_rank` (empty ids -> a dummy micro-batch)."""
    per_seq_multiple, total_multiple = _layout_multiple(tp, cp)
    seqs = [torch.cat([batch.prompt_ids[i], batch.response_ids[i]]) for i in sample_ids]
    prompt_lens = [batch.prompt_ids[i].numel() for i in sample_ids]
    if not seqs:  # dummy: one all-padding sequence, no labels, so ranks stay in lock-step
        seqs, prompt_lens = [torch.full((total_multiple,), pad_id, dtype=torch.long)], [total_multiple]
    width = max((batch.response_ids[i].numel() for i in sample_ids), default=0)

    if packing:
        padded = [round_up(s.numel(), per_seq_multiple) for s in seqs]
        padded[-1] += round_up(sum(padded), total_multiple) - sum(padded)
        tokens, labels, rows, cols, token_rows = _flat_streams(seqs, prompt_lens, padded, pad_id)
        positions = torch.cat([torch.arange(n) for n in padded])
        local = thd_cp_local_index(padded, cp, cp_rank)
        tokens, labels, rows, cols, positions, token_rows = (
            x[local].unsqueeze(0) for x in (tokens, labels, rows, cols, positions, token_rows))
        packed = _packed_seq_params(seqs, padded)
    else:
        length = round_up(max(s.numel() for s in seqs), total_multiple)
        parts = [_flat_streams([s], [p], [length], pad_id) for s, p in zip(seqs, prompt_lens)]
        tokens, labels, rows, cols, token_rows = (torch.stack([p[k] for p in parts]) for k in range(5))
        rows = torch.arange(len(seqs)).unsqueeze(1).expand_as(rows).clone().masked_fill_(cols < 0, -1)
        token_rows = torch.arange(len(seqs)).unsqueeze(1).expand_as(token_rows).clone().masked_fill_(token_rows < 0, -1)
        positions = torch.arange(length).unsqueeze(0).expand(len(seqs), length).contiguous()
        tokens, labels, rows, cols, positions, token_rows = (
            split_for_cp(x, cp, cp_rank, dim=1) for x in (tokens, labels, rows, cols, positions, token_rows))
        packed = None

    flat_cols = cols.reshape(-1)
    label_index = torch.nonzero(flat_cols >= 0).reshape(-1)
    rows_sel, cols_sel = rows.reshape(-1)[label_index], flat_cols[label_index]
    n_rows = len(sample_ids)
    kept = torch.zeros(n_rows, width, dtype=torch.bool)  # response tokens the loss mask keeps
    for r, i in enumerate(sample_ids):
        n = batch.response_ids[i].numel()
        kept[r, :n] = True if batch.loss_mask is None else batch.loss_mask[i]
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    mask[rows_sel, cols_sel] = kept[rows_sel, cols_sel]
    fields = {}
    for name in TOKEN_FIELDS:
        values = getattr(batch, name)
        if values is not None:
            dense = torch.zeros(n_rows, width)
            for r, i in enumerate(sample_ids):
                dense[r, : values[i].numel()] = values[i]
            fields[name] = dense
    advantages = batch.advantages[sample_ids] if batch.advantages is not None else None
    return MicroBatch(
        sample_ids=list(sample_ids), tokens=tokens, positions=positions, labels=labels.clamp(min=0),
        packed_seq_params=packed, label_index=label_index, rows=rows_sel, cols=cols_sel, mask=mask,
        fields=fields, advantages=advantages, num_model_tokens=int(tokens.numel()),
        token_rows=token_rows if sample_ids else torch.full_like(tokens, -1),
    )


def _flat_streams(seqs, prompt_lens, padded_lengths, pad_id):
    """Concatenated tokens, labels, row ids and response columns (-1 = not a response label) of padded seqs, and each
    token's row (-1 = padding)."""
    tokens, labels, rows, cols, token_rows = [], [], [], [], []
    for row, (s, p, n) in enumerate(zip(seqs, prompt_lens, padded_lengths)):
        length = s.numel()
        tok = torch.full((n,), pad_id, dtype=torch.long)
        tok[:length] = s
        lab = torch.full((n,), -1, dtype=torch.long)
        lab[: length - 1] = s[1:]
        col = torch.full((n,), -1, dtype=torch.long)
        # position t predicts token t+1; it is a response label when p <= t+1 < length
        col[p - 1 : length - 1] = torch.arange(length - p)
        tokens.append(tok)
        labels.append(lab)
        rows.append(torch.where(col >= 0, row, -1))
        cols.append(col)
        token_rows.append(torch.where(torch.arange(n) < length, row, -1))
    return torch.cat(tokens), torch.cat(labels), torch.cat(rows), torch.cat(cols), torch.cat(token_rows)


def _packed_seq_params(seqs, padded):
    from megatron.core.packed_seq_params import PackedSeqParams

    real = torch.tensor([0] + [s.numel() for s in seqs]).cumsum(0).to(torch.int32)
    pad = torch.tensor([0] + list(padded)).cumsum(0).to(torch.int32)
    if torch.cuda.is_available():
        real, pad = real.cuda(), pad.cuda()
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=pad, cu_seqlens_kv_padded=pad,
        max_seqlen_q=max(padded), max_seqlen_kv=max(padded),
    )
