"""The floor of an RL step: the quickstart's work done by the simplest loop there is, against the quickstart itself.

    out = floor_rows(workdir, steps=12, skip=2)    # trains the quickstart, then the plain loop from its last weights

The plain loop is what a researcher first writes: one Python process, a `transformers` model, `generate` with the
quickstart's sampling settings (n samples per prompt, temperature, top_p, max_tokens), the reward function called
in-process, LUSPO from `megatron_rl.algorithms` (the same `policy_loss`, old log-probs = this forward's, detached:
one on-policy step), AdamW with the quickstart's lr / weight decay / gradient clipping. No Ray, no vLLM, no Megatron,
no weight sync, no dynamic sampling: every generated group is trained.

"At equal work": the quickstart generates more samples than it trains (dynamic sampling over-samples, then keeps
the informative groups), so the loop's cost per generated sample (generation, scoring) and per trained token
(forward + backward + optimizer) is measured, and scaled to the quickstart's mean counts per step. The ratio
quickstart / floor per part is what the system around the arithmetic costs.

Both run from the same weights: the quickstart trains `steps` RL steps (timed by the trainer, `time/*`), its last
checkpoint is converted to Hugging Face, and the loop runs `steps` steps from it on the same prompt set; the first
`skip` steps of each are left out (allocator and engine warm-up).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Sequence

from megatron_rl.benchmarks.step import QUIET_OVERRIDES, run_training

PARTS = ("rollout", "reward", "train", "sync", "other")
PART_NAMES = {"rollout": "generation", "reward": "scoring", "train": "log-probs + update", "sync": "weight sync",
              "other": "other (driver)"}


def plain_rl_loop(hf_dir: str, cfg, *, steps: int, threads: int | None = None) -> list[dict[str, float]]:
    """`steps` steps of the plain loop (module docstring) with the settings of TrainConfig `cfg`; per step its
    seconds per part and its counts (samples generated and trained, trained response tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.algorithms import compute_advantages, policy_loss
    from megatron_rl.data import ResumableSampler, build_prompt_dataset
    from megatron_rl.rewards import resolve_reward_fn

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    data = build_prompt_dataset(cfg.data.train, tokenizer, key="data.train")
    reward = resolve_reward_fn(cfg.reward.fn, dict(cfg.reward.kwargs))
    opt_cfg, sampling, n = cfg.actor.optimizer, cfg.sampling, cfg.sampling.n
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay,
                                  betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2), eps=opt_cfg.adam_eps)
    sampler = ResumableSampler(len(data), seed=cfg.run.seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for _ in range(steps):
        examples = [data.examples[i] for i in sampler.next_indices(cfg.algorithm.prompts_per_step)]
        # ---- generation: left-padded prompts, n samples each
        start = time.perf_counter()
        width = max(len(e.prompt_token_ids) for e in examples)
        ids = torch.tensor([[pad] * (width - len(e.prompt_token_ids)) + e.prompt_token_ids for e in examples])
        attention = (torch.arange(width)[None, :] >= torch.tensor([width - len(e.prompt_token_ids)
                                                                   for e in examples])[:, None]).long()
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True,
                                 temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_new_tokens=sampling.max_tokens, num_return_sequences=n, pad_token_id=pad,
                                 eos_token_id=eos)
        responses = []
        for row in out[:, width:].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            responses.append(row[:cut])
        generation_s = time.perf_counter() - start
        # ---- scoring, in-process
        start = time.perf_counter()
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards = torch.tensor([float(reward(t, examples[i // n].ground_truth, examples[i // n].data_source,
                                             examples[i // n].extra_info)) for i, t in enumerate(texts)])
        scoring_s = time.perf_counter() - start
        # ---- one LUSPO step on every group: padded [prompt + response], old log-probs = this forward's
        start = time.perf_counter()
        model.train()
        advantages = compute_advantages(cfg.algorithm.advantage, rewards, group_size=n)
        prompts = [examples[i // n].prompt_token_ids for i in range(len(responses))]
        seqs = [p + r for p, r in zip(prompts, responses)]
        length = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [pad] * (length - len(s)) for s in seqs])
        resp_len = max(max(len(r) for r in responses), 1)
        logits = model(input_ids=tokens).logits[:, :-1].float() / cfg.actor.temperature
        logp_all = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        logp = torch.zeros(len(seqs), resp_len)
        mask = torch.zeros(len(seqs), resp_len, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logp[i, : len(r)] = logp_all[i, len(p) - 1 : len(p) - 1 + len(r)]
            mask[i, : len(r)] = True
        loss, _ = policy_loss(cfg.actor.loss.name, logp, logp.detach(), advantages, mask,
                              **{k: v for k, v in cfg.actor.loss.options().items() if k in ("clip_low", "clip_high")})
        optimizer.zero_grad()
        loss.backward()
        if opt_cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_grad)
        optimizer.step()
        update_s = time.perf_counter() - start
        rows.append({"rollout": generation_s, "reward": scoring_s, "train": update_s, "sync": 0.0, "other": 0.0,
                     "generated": float(len(responses)), "trained": float(len(responses)),
                     "trained_tokens": float(sum(len(r) for r in responses))})
    return rows


def _mean(records: Sequence[dict], key: str, default: float = 0.0) -> float:
    return statistics.mean(float(r.get(key, default)) for r in records)


def floor_rows(workdir: str, *, steps: int = 12, skip: int = 2, config: str | None = None,
               overrides: Sequence[str] = (), threads: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Train the quickstart (or `config`), run the plain loop from its last weights; the per-part table."""
    from megatron_rl.checkpoint.convert import convert_to_hf
    from megatron_rl.checkpoint.names import CHECKPOINTS_DIR
    from megatron_rl.checkpoint.run_state import latest_checkpoint
    from megatron_rl.commands.train import default_config_path
    from megatron_rl.config import load_config
    from megatron_rl.training.metrics_logger import read_jsonl

    run_dir = os.path.join(workdir, "step_run")
    metrics_path = run_training(run_dir, steps=steps, config=config,
                                overrides=(*overrides, "checkpoint.at_exit=true"))
    quick = [r for r in read_jsonl(metrics_path) if "time/step" in r][skip:]
    cfg = load_config(config or default_config_path(),
                      [*QUIET_OVERRIDES, *overrides, f"run.output_dir={workdir}", "run.name=step_run"])
    _, ckpt = latest_checkpoint(os.path.join(run_dir, CHECKPOINTS_DIR))
    hf_dir = os.path.join(workdir, "hf_last")
    convert_to_hf(ckpt, hf_dir, overwrite=True, progress=False)
    plain = plain_rl_loop(hf_dir, cfg, steps=steps, threads=threads)[skip:]

    generated = _mean(quick, "rollout/num_samples")
    trained_tokens = _mean(quick, "train/num_response_tokens")
    per_sample = {part: _mean(plain, part) / _mean(plain, "generated") for part in ("rollout", "reward")}
    per_token = _mean(plain, "train") / _mean(plain, "trained_tokens")
    floor = {"rollout": per_sample["rollout"] * generated, "reward": per_sample["reward"] * generated,
             "train": per_token * trained_tokens, "sync": 0.0, "other": 0.0}
    rows = []
    for part in PARTS:
        q = _mean(quick, f"time/{part}")
        rows.append({"part": PART_NAMES[part], "quickstart_s": round(q, 4), "floor_s": round(floor[part], 4),
                     "ratio": round(q / floor[part], 2) if floor[part] else None})
    total_q, total_f = _mean(quick, "time/step"), sum(floor.values())
    rows.append({"part": "step (total)", "quickstart_s": round(total_q, 4), "floor_s": round(total_f, 4),
                 "ratio": round(total_q / total_f, 2)})
    work = [{"measure": "samples generated per step", "quickstart": round(generated, 1),
             "plain loop": round(_mean(plain, "generated"), 1)},
            {"measure": "sequences trained per step", "quickstart": round(_mean(quick, "train/num_sequences"), 1),
             "plain loop": round(_mean(plain, "trained"), 1)},
            {"measure": "response tokens trained per step", "quickstart": round(trained_tokens, 1),
             "plain loop": round(_mean(plain, "trained_tokens"), 1)},
            {"measure": "plain loop: generation s per sample", "quickstart": None,
             "plain loop": round(per_sample["rollout"], 6)},
            {"measure": "plain loop: update s per trained token", "quickstart": None,
             "plain loop": round(per_token, 7)}]
    return {"parts": rows, "work": work}
