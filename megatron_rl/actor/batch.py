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
    # whole-batch tensor ops, no per-sequence Python loop: a micro-batch holds hundreds of short RL sequences
    prompt_lens = [len(batch.prompt_ids[i]) for i in sample_ids]
    response_lens = [len(batch.response_ids[i]) for i in sample_ids]
    seq_lens = [p + r for p, r in zip(prompt_lens, response_lens)]
    flat = torch.cat([t for i in sample_ids for t in (batch.prompt_ids[i], batch.response_ids[i])]) \
        if sample_ids else torch.full((total_multiple,), pad_id, dtype=torch.long)
    if not sample_ids:  # dummy: one all-padding sequence, no labels, so ranks stay in lock-step
        prompt_lens, seq_lens = [total_multiple], [total_multiple]
    width = max(response_lens, default=0)

    if packing:
        padded = [round_up(n, per_seq_multiple) for n in seq_lens]
        padded[-1] += round_up(sum(padded), total_multiple) - sum(padded)
        tokens, labels, rows, cols, token_rows, positions = _flat_streams(flat, seq_lens, prompt_lens, padded, pad_id)
        local = thd_cp_local_index(padded, cp, cp_rank)
        tokens, labels, rows, cols, positions, token_rows = (
            x[local].unsqueeze(0) for x in (tokens, labels, rows, cols, positions, token_rows))
        packed = _packed_seq_params(seq_lens, padded)
    else:
        length = round_up(max(seq_lens), total_multiple)
        streams = _flat_streams(flat, seq_lens, prompt_lens, [length] * len(seq_lens), pad_id)
        tokens, labels, rows, cols, token_rows, positions = (x.view(len(seq_lens), length) for x in streams)
        tokens, labels, rows, cols, positions, token_rows = (
            split_for_cp(x, cp, cp_rank, dim=1) for x in (tokens, labels, rows, cols, positions, token_rows))
        packed = None

    flat_cols = cols.reshape(-1)
    label_index = torch.nonzero(flat_cols >= 0).reshape(-1)
    rows_sel, cols_sel = rows.reshape(-1)[label_index], flat_cols[label_index]
    n_rows = len(sample_ids)
    dense_at = _response_grid(response_lens)  # (row, column) of every response token of sample_ids, in order

    def dense(values: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(n_rows, width, dtype=dtype)
        if sample_ids:
            out[dense_at] = torch.cat([values[i] for i in sample_ids])
        return out

    if batch.loss_mask is not None:  # the response tokens the loss mask keeps
        kept = dense(batch.loss_mask, torch.bool)
    else:
        kept = torch.zeros(n_rows, width, dtype=torch.bool)
        kept[dense_at] = True
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    mask[rows_sel, cols_sel] = kept[rows_sel, cols_sel]
    fields = {name: dense(getattr(batch, name), torch.float32) for name in TOKEN_FIELDS
              if getattr(batch, name) is not None}
    advantages = batch.advantages[sample_ids] if batch.advantages is not None else None
    return MicroBatch(
        sample_ids=list(sample_ids), tokens=tokens, positions=positions, labels=labels.clamp(min=0),
        packed_seq_params=packed, label_index=label_index, rows=rows_sel, cols=cols_sel, mask=mask,
        fields=fields, advantages=advantages, num_model_tokens=int(tokens.numel()),
        token_rows=token_rows if sample_ids else torch.full_like(tokens, -1),
    )


def _flat_streams(flat, lengths, prompt_lens, padded_lengths, pad_id):
    """One stream of the sequences in `flat` (concatenated, `lengths` tokens each), sequence k right-padded to
    padded_lengths[k]: its tokens, labels (-1 = none), row ids and response columns (-1 = not a response label), each
    token's row (-1 = padding) and its position within its sequence. Position t predicts token t+1; it is a
    response label when prompt_len <= t+1 < length."""
    padded = torch.tensor(padded_lengths, dtype=torch.long)
    length, prompt = torch.tensor(lengths, dtype=torch.long), torch.tensor(prompt_lens, dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(padded_lengths)), padded)  # the sequence of each stream slot
    position = torch.arange(row.numel()) - (padded.cumsum(0) - padded)[row]
    source = (length.cumsum(0) - length)[row] + position  # index into flat where the slot holds a real token
    real, labelled = position < length[row], position < length[row] - 1
    tokens = torch.full_like(row, pad_id)
    tokens[real] = flat[source[real]]
    labels = torch.full_like(row, -1)
    labels[labelled] = flat[source[labelled] + 1]
    response = labelled & (position >= prompt[row] - 1)
    cols = torch.where(response, position - (prompt[row] - 1), -1)
    return tokens, labels, torch.where(response, row, -1), cols, torch.where(real, row, -1), position


def _response_grid(response_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) in the [B, R] response layout of every response token, sequence after sequence."""
    lens = torch.tensor(response_lens, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(response_lens)), lens)
    return rows, torch.arange(rows.numel()) - (lens.cumsum(0) - lens)[rows]


def _packed_seq_params(lengths, padded):
    from megatron.core.packed_seq_params import PackedSeqParams

    real = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    pad = torch.tensor([0] + list(padded)).cumsum(0).to(torch.int32)
    if torch.cuda.is_available():
        real, pad = real.cuda(), pad.cuda()
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=pad, cu_seqlens_kv_padded=pad,
        max_seqlen_q=max(padded), max_seqlen_kv=max(padded),
    )
