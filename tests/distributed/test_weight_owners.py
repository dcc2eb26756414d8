"""Owner sends' producer side (actor/weight_source.py): in PP2, TP2 x PP2 (dense) and EP2 (MoE) layouts each owner
yields exactly its own share of the model, bucket by bucket, and the shares put together are the full model's tensors
(the HF checkpoint the actor was loaded from: exact, the export only moves and concatenates floats).

Checked per layout, on every rank:
- `metadata()` is the whole model on every rank, identical across ranks, equal to the checkpoint's names, shapes and
  dtypes (vLLM's `WeightSource` contract);
- `held_names()` partition the model: disjoint, covering every tensor; with PP each owner holds only its stage's
  layers (and the embedding / head of its end), with EP only its experts;
- `buckets()` on an owner yields only its own names, no bucket above the bound (a larger tensor alone), and no rank
  ever yields a tensor it does not own (nothing gathered on one rank);
- vLLM's iteration contract (`__iter__`: names of the rank's groups in metadata order, None where not held);
- the ipc transport's source (`export_hf_weights(dst=None, host_copies=False)`): every rank gets every tensor.
"""
import re

import pytest
import torch

from megatron_rl.actor.config import ActorConfig
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.spawn import spawn_ranks

pytestmark = pytest.mark.distributed

BUCKET_BYTES = 100_000  # below the largest tiny tensors (the 512 x 128 fp32 embedding: 262144 bytes): some go alone


def _owner_rank(path: str, layout: dict) -> dict:
    import torch.distributed as dist

    from megatron_rl.actor.megatron_actor import MegatronActor

    actor = MegatronActor(ActorConfig(model_path=path, layout=ParallelLayout(**layout))).setup()
    source = actor.weight_source(bucket_bytes=BUCKET_BYTES)
    metadata = [(m.name, str(m.dtype), tuple(m.shape)) for m in source.metadata()]
    buckets = [[(name, tensor.clone()) for name, tensor in bucket] for bucket in source.buckets()]
    iterated = [(name, tensor is not None) for name, tensor in source]
    groups = source.groups()
    # what the ipc transport sends from every rank: every whole bucket, as views on the exchange device
    whole = [[(name, tensor.clone()) for name, tensor in bucket]
             for bucket in actor.export_hf_weights(bucket_bytes=BUCKET_BYTES, dst=None, host_copies=False)]
    out = {"rank": dist.get_rank(), "metadata": metadata, "held": source.held_names(), "buckets": buckets,
           "iterated": iterated, "groups": groups, "num_buckets": len(source.plan.buckets), "whole": whole}
    actor.shutdown()
    return out


def _layers(names) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}


def _experts(names) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.search(r"\.experts\.(\d+)\.", n))}


def _check(path: str, layout: dict, world: int) -> list[dict]:
    import glob

    from safetensors.torch import load_file

    ranks = spawn_ranks(_owner_rank, world, args=(path, layout), timeout=600)
    checkpoint = {}
    for f in glob.glob(f"{path}/*.safetensors"):
        checkpoint.update(load_file(f))
    expected_meta = sorted((n, str(t.dtype), tuple(t.shape)) for n, t in checkpoint.items())
    for r in ranks:
        assert r["metadata"] == ranks[0]["metadata"], "metadata differs between ranks"
    assert sorted(ranks[0]["metadata"]) == expected_meta
    held = [set(r["held"]) for r in ranks]
    assert set().union(*held) == set(checkpoint), "some tensor has no owner"
    assert sum(map(len, held)) == len(checkpoint), "some tensor has two owners"
    sent = {}
    for r, mine in zip(ranks, held):
        assert len(r["buckets"]) == r["num_buckets"], "every rank must iterate every bucket (collective)"
        for bucket in r["buckets"]:
            names = [n for n, _ in bucket]
            assert set(names) <= mine, f"rank {r['rank']} yielded tensors it does not own"
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            assert size <= BUCKET_BYTES or len({n.rsplit('.', 2)[0] for n in names}) == 1, (names, size)
            sent.update(bucket)
        # vLLM's iteration contract: this rank's groups' names, metadata order, tensors exactly where held
        order = [m[0] for m in r["metadata"]]
        in_groups = [n for g in r["groups"] for n in g]
        assert [n for n, _ in r["iterated"]] == [n for n in order if n in set(in_groups)]
        assert all(has == (n in mine) for n, has in r["iterated"])
    assert sent.keys() == checkpoint.keys()
    for name, tensor in checkpoint.items():
        assert torch.equal(sent[name], tensor), name
    for r in ranks:  # ipc: every rank holds every tensor, bucket by bucket, bit for bit
        whole = [item for bucket in r["whole"] for item in bucket]
        assert len(whole) == len(checkpoint) and dict(whole).keys() == checkpoint.keys(), f"rank {r['rank']}"
        for name, tensor in whole:
            assert torch.equal(tensor, checkpoint[name]), (r["rank"], name)
    return ranks


@pytest.mark.parametrize("layout, world", [({"pp": 2}, 2), ({"tp": 2, "pp": 2}, 4)], ids=["pp2", "tp2-pp2"])
def test_pipeline_owners_send_their_own_stage(tiny_model, layout, world):
    """With TP the owner is TP rank 0 of its stage (it gathers its peers' shards); the peers own nothing."""
    ranks = _check(tiny_model("qwen3"), layout, world)
    owners = [set(r["held"]) for r in ranks if r["held"]]
    assert len(owners) == 2, "one owner per stage"
    first, last = owners
    assert _layers(first) and _layers(last) and not _layers(first) & _layers(last)
    assert max(_layers(first)) < min(_layers(last))
    assert "model.embed_tokens.weight" in first and "model.norm.weight" in last


def test_expert_owners_send_their_own_experts(tiny_model):
    """EP2 of the tiny Qwen3-MoE: the dense parts are owned by rank 0 (both hold them), experts split by EP rank."""
    ranks = _check(tiny_model("qwen3_moe"), {"ep": 2}, 2)
    first, second = (set(r["held"]) for r in ranks)
    assert _experts(first) and _experts(second) and not _experts(first) & _experts(second)
    assert all(".experts." in n for n in second), "rank 1 owns only its experts"
