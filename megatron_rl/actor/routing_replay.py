"""MoE routing replay in the Megatron actor (docs/actor.md, "Routing replay").

In MoE RL the engine that sampled and the trainer can route a token to different experts (other kernels, bf16 vs
fp32, ties), so the trainer's log-probs, and the importance ratios GSPO/LUSPO clip at 2e-3, belong to another network
than the one that sampled. Routing replay makes every actor pass over a sample use the experts recorded for it:

- R3, "rollout" (Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by Aligning Training and Inference
  Routers", arXiv 2510.11370): the experts the rollout engine routed each token of prompt + response to;
- R2, "old_policy": the experts the actor's own old-log-prob forward chose (GSPO's "Routing Replay", Zheng et al.
  2025, arXiv 2507.18071 Sec. 5.3; R3's paper calls it R2): that pass records its routers' top-k (megatron-core's
  RouterReplay RECORD), each rank files what it recorded under (sample, position, layer) through the same token
  order as replay uses, and a MAX-reduce to global rank 0 assembles every sample's table (each (token, layer) is
  recorded by the ranks that ran it: TP ranks agree, DP/CP/PP/SP ranks hold disjoint parts); the trainer hands the
  tables back with the batch and the training passes replay them like R3's.

What is replayed is the top-k *selection* only: each router still computes its logits, and the gate weights are the
softmax of the router's own logits over the replayed experts (megatron-core 0.16's `RouterReplay` REPLAY_FORWARD:
`probs = softmax(logits.gather(replayed))`), so the router keeps its gradient, as in R3 (Sec. 3.2).

Layout (docs/design.md, contract 2's sibling): a sample's routing is a [prompt + response - 1, MoE layers, top-k]
array in token order. For a micro-batch on this rank, each token the model runs (after packing or padding, the CP
split, and, inside the model, the sequence-parallel split over TP) is looked up by (its row, its position); the
sequence's last token (never run by the engine) and padding get a placeholder selection (experts 0..k-1), whose
outputs reach no loss term (a causal model: nothing attends to them, no label reads them). Megatron routes
[sequence, batch] order, so targets are built [S, B] and, under sequence parallelism, this TP rank's S/tp slice.
Each pipeline stage and virtual chunk replays its own layers (routers are found per chunk by their global layer
number); expert parallelism dispatches after routing, so EP changes nothing here.

`moe/routing_agreement`: while replaying, each router also takes its own top-k of the same logits; the share of
(token, MoE layer) pairs whose own top-k set equals the replayed one, over real tokens, is the agreement between the
trainer's routing without replay and the recorded one.
"""
from __future__ import annotations

import torch

from megatron_rl.actor.batch import MicroBatch

__all__ = ["RoutingReplay"]


class RoutingReplay:
    """The routers of one model (its pipeline chunks on this rank) and how to make them replay a micro-batch."""

    def __init__(self, chunks: list, moe_layer_ids: list[int], top_k: int, num_experts: int):
        """chunks: this rank's model chunks (wrapped or not); moe_layer_ids: the global 0-based decoder layers with
        experts, ascending (the routing arrays' second axis)."""
        from megatron.core.transformer.moe.router import TopKRouter

        self.top_k = top_k
        self.num_experts = num_experts
        self.num_layers = len(moe_layer_ids)
        moe_index = {layer: i for i, layer in enumerate(moe_layer_ids)}  # global 0-based layer -> routing column
        self.routers: dict[int, list[tuple[int, object]]] = {}  # id(chunk) -> [(routing column, router)]
        for chunk in chunks:
            chunk = _unwrap(chunk)
            found = []
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    if module.router_replay is None:
                        raise RuntimeError("routing replay needs TransformerConfig.moe_enable_routing_replay=True")
                    found.append((moe_index[module.layer_number - 1], module))
                    _count_agreement(module.router_replay)
            self.routers[id(chunk)] = found
        self.agree = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)

    def set_targets(self, chunk, mb: MicroBatch, routes: list[torch.Tensor], tp: int, tp_rank: int,
                    sequence_parallel: bool, recomputed_in_backward: bool = False) -> None:
        """Make `chunk`'s routers replay `mb`: routes[i] is the routing of the batch's sample i.

        recomputed_in_backward: a training pass whose layers are recomputed in backward (full activation recompute).
        Megatron's checkpoint runs the first forward under no_grad and the recompute under enable_grad, and a
        pipeline schedule may forward later micro-batches before it recomputes this one, so the targets are also
        queued (RouterReplay.set_target_indices) and a recompute takes the oldest (RouterReplay's REPLAY_BACKWARD
        queue): backward runs each chunk's micro-batches in their forward order."""
        routers = self.routers.get(id(_unwrap(chunk)))
        if not routers:
            return
        rows, positions = _router_tokens(mb, tp, tp_rank, sequence_parallel)
        num_layers = routes[0].shape[1] if routes else 0
        targets = torch.arange(self.top_k, dtype=torch.long).expand(rows.numel(), num_layers, self.top_k).clone()
        valid = torch.zeros(rows.shape, dtype=torch.bool)
        for i, where in _sample_tokens(mb, rows, positions, routes):
            if where.any():
                targets[where] = routes[i][positions[where]].long()
                valid |= where
        device = _device()
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for column, router in routers:
            replay = router.router_replay
            if recomputed_in_backward:
                replay.set_target_indices(targets[:, column].to(device))
            else:
                replay.target_topk_idx = targets[:, column].to(device)
            replay.replay_valid = valid.to(device)
            replay.recomputed_in_backward = recomputed_in_backward
            replay.counts = (self.agree, self.total)
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    # ---- R2: record the routing of a forward pass ----------------------------------------------------------------
    def start_recording(self) -> None:
        """Every router records its own top-k of the next forwards (RouterReplay RECORD)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for routers in self.routers.values():
            for _, router in routers:
                router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)

    def new_tables(self, batch) -> list[torch.Tensor]:
        """One [prompt + response - 1, MoE layers, top-k] table per sample, 0 = not recorded here (ids are stored
        + 1, so that a MAX over ranks assembles them; uint8 below 256 experts: 384 bytes per token at 30B)."""
        dtype = torch.uint8 if self.num_experts < 256 else torch.int32  # what gloo and NCCL MAX-reduce
        return [torch.zeros(p.numel() + r.numel() - 1, self.num_layers, self.top_k, dtype=dtype)
                for p, r in zip(batch.prompt_ids, batch.response_ids)]

    def collect(self, chunk, mb: MicroBatch, tables: list[torch.Tensor], tp: int, tp_rank: int,
                sequence_parallel: bool) -> None:
        """File what `chunk`'s routers recorded for `mb` (just run) into the samples' tables."""
        routers = self.routers.get(id(_unwrap(chunk)))
        if not routers:
            return
        rows, positions = _router_tokens(mb, tp, tp_rank, sequence_parallel)
        for column, router in routers:
            recorded = router.router_replay.get_recorded_indices()
            if recorded is None or recorded.shape[0] != rows.numel():
                raise RuntimeError(f"routing replay: MoE layer {router.layer_number} recorded "
                                   f"{None if recorded is None else recorded.shape[0]} tokens, expected {rows.numel()}")
            recorded = recorded.to("cpu")
            for i, where in _sample_tokens(mb, rows, positions, tables):
                tables[i][positions[where], column] = (recorded[where] + 1).to(tables[i].dtype)

    @staticmethod
    def assemble(tables: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Every rank's recorded tables MAX-reduced to global rank 0 (collective): the samples' routing, expert ids
        [prompt + response - 1, MoE layers, top-k] (uint8 below 256 experts), on rank 0; None elsewhere."""
        import torch.distributed as dist

        from megatron_rl.actor.batch import pack_ragged, unpack_ragged

        flat, lengths = pack_ragged(tables)
        reduced = flat.to(_device())
        dist.reduce(reduced, dst=0, op=dist.ReduceOp.MAX)
        if dist.get_rank() != 0:
            return None
        reduced = reduced.cpu()
        if (reduced == 0).any():
            raise RuntimeError("routing replay: some (token, MoE layer) routing was recorded by no rank")
        ids = reduced - 1
        return unpack_ragged(ids if ids.dtype == torch.uint8 else ids.to(torch.int16), lengths)

    def clear(self) -> None:
        """Back to each router's own top-k (no replay) and no stored targets."""
        for routers in self.routers.values():
            for _, router in routers:
                replay = router.router_replay
                replay.clear_router_replay_action()
                replay.clear_indices()
                replay.replay_valid = None
                replay.recomputed_in_backward = False

    def take_agreement(self) -> tuple[float, float]:
        """(agreeing, counted) (token, MoE layer) pairs since the last call, on this rank."""
        out = (float(self.agree), float(self.total))
        self.agree.zero_()
        self.total.zero_()
        return out


def _router_tokens(mb: MicroBatch, tp: int, tp_rank: int, sequence_parallel: bool):
    """(row in the micro-batch, position in its sequence) of every token a router of this rank sees for `mb`, in
    the router's order: Megatron's [sequence, batch] flattened, under sequence parallelism this TP rank's S/tp slice.
    Padding has row -1; the packed or padded layout and the CP split are already in mb.token_rows / mb.positions."""
    rows, positions = mb.token_rows.t(), mb.positions.t()  # [S, B]
    if sequence_parallel and tp > 1:
        per_rank = rows.shape[0] // tp
        rows = rows[tp_rank * per_rank : (tp_rank + 1) * per_rank]
        positions = positions[tp_rank * per_rank : (tp_rank + 1) * per_rank]
    return rows.reshape(-1), positions.reshape(-1)


def _sample_tokens(mb: MicroBatch, rows: torch.Tensor, positions: torch.Tensor, tables: list[torch.Tensor]):
    """(sample index in the batch, mask over `_router_tokens`) of each sample of `mb`: its tokens that have a row in
    its routing table (the last token of a sequence is never run by the engine, so it has none)."""
    for r, i in enumerate(mb.sample_ids):
        yield i, (rows == r) & (positions < tables[i].shape[0])


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _unwrap(chunk):
    """The module inside DDP / Float16Module wrappers (routers were found there)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _count_agreement(replay) -> None:
    """Wrap this layer's RouterReplay.get_replay_topk: a recompute in backward replays the queued targets of its own
    micro-batch (RoutingReplay.set_targets); a forward also counts whether the router's own top-k (of the same
    scores) equals the replayed selection, over real tokens (module docstring)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    original = replay.get_replay_topk
    replay.replay_valid = None
    replay.counts = None
    replay.recomputed_in_backward = False

    def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        forward = replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD
        if forward and replay.recomputed_in_backward and torch.is_grad_enabled():  # the recompute in backward
            replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
            try:
                return original(scores, topk, num_groups, group_topk, default_compute_topk)
            finally:
                replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        probs, indices = original(scores, topk, num_groups, group_topk, default_compute_topk)
        if forward and replay.counts is not None:
            with torch.no_grad():
                _, own = default_compute_topk(scores.detach(), topk, num_groups=num_groups, group_topk=group_topk)
                same = (own.sort(dim=-1).values == indices.sort(dim=-1).values).all(dim=-1)
                valid = replay.replay_valid
                agree, total = replay.counts
                agree += (same & valid).sum().to(agree)
                total += valid.sum().to(total)
        return probs, indices

    replay.get_replay_topk = get_replay_topk
