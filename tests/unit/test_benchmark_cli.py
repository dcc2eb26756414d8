"""tools/benchmark.py: argument handling, the cp subcommand end to end, the GPU refusal, the pure pieces of the
benchmark modules (tables, step breakdown, length spreads, bucketing, FLOP counting), and (slow) the rollout, sync
and step subcommands end to end."""
import json

import pytest
import torch

from megatron_rl.benchmarks.cp import SIZES
from tests.unit.test_plot_metrics import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("tools/benchmark.py", "benchmark_tool")


def _one_table(bench, tmp_path, argv: list[str]) -> list[dict]:
    """Run `tools/benchmark.py argv --json <file>`, check it exits 0, and return the rows of the one table it wrote."""
    path = tmp_path / f"{argv[0]}_{len(list(tmp_path.glob('*.json')))}.json"
    assert bench.main([*argv, "--json", str(path)]) == 0
    (rows,) = json.loads(path.read_text())["tables"].values()
    return rows


@pytest.mark.parametrize("argv, message", [
    (["rollout", "--batch-sizes", "8,x"], "comma-separated integers"),
    (["rollout", "--batch-sizes", "0"], "positive integers"),
    (["sync", "--sizes", "tiny,huge"], "unknown model size"),
    (["refit", "--layouts", "tp2"], "layouts are '1' (one rank) and 'pp2'"),
    (["train", "--spreads", "-1"], "positive numbers"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_exit_2_naming_the_problem(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "--steps must be >= 1"),
    (["cp", "--width", "7", "--cp", "2"], "divisible"),
    (["step", "run.steps"], "key=value"),
    (["step", "--steps", "2", "--skip", "2"], "--steps 2 must exceed --skip 2"),
    (["rollout", "--engines", "1,4", "--num-cpus", "2"], "--engines 4 needs --num-cpus >= 4"),
    (["sync", "--engines", "3"], "--engines 3 needs --num-cpus >= 3"),
])
def test_bad_values_fail_before_any_work(bench, argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_refuses_clearly_without_cuda(bench, capsys):
    assert bench.main(["gpu"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err


def test_cp_subcommand_prints_tables_and_writes_json(bench, tmp_path, capsys):
    path = tmp_path / "cp.json"
    assert bench.main(["cp", "--no-timing", "--json", str(path), "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 256 | 8192 | 4 | 12.0 KiB | 24.0 MiB | 2,048x |" in out  # T/4 = 2048 for fp32 both sides
    payload = json.loads(path.read_text())
    assert payload["command"] == "cp"
    expected = {"date", "cpu", "cores", "versions", "load_avg_1min_start", "load_avg_1min_end"}
    assert expected <= set(payload["environment"])
    (rows,) = payload["tables"].values()
    assert [r["ratio"] for r in rows] == [f"{t // 4:,}x" for _, t, _ in SIZES]


def test_markdown_table_union_of_columns_and_number_format():
    from megatron_rl.benchmarks.report import markdown_table

    table = markdown_table([{"a": 1, "b": 0.12345}, {"a": 2, "c": "x", "b": float("nan")}])
    lines = table.splitlines()
    assert lines[0] == "| a | b | c |"
    assert lines[1] == "|---:|---:|---|"
    assert lines[2] == "| 1 | 0.123 |  |" and lines[3] == "| 2 | - | x |"
    assert markdown_table([]) == "(no rows)"


def test_step_breakdown_means_and_shares(tmp_path):
    from megatron_rl.benchmarks.step import step_breakdown

    records = [{"step": 0, "eval/accuracy": 0.1}]  # evaluation-only record: not an RL step
    for s in range(1, 5):
        slow = 10.0 if s == 1 else 1.0  # the first step is a warm-up
        records.append({"step": s, "time/rollout": 2.0 * slow, "time/reward": 0.5, "time/train": 1.0,
                        "time/sync": 0.25, "time/other": 0.25, "time/step": 4.0 + 2.0 * (slow - 1),
                        "train/step_seconds": 0.75, "train/fwd_bwd_seconds": 0.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {r["part"]: r for r in step_breakdown(str(path), skip=1)}
    assert rows["rollout"]["mean_s"] == 2.0 and rows["rollout"]["share"] == 0.5
    assert rows["step (total)"]["mean_s"] == 4.0
    shares = sum(rows[p]["share"] for p in ("rollout", "reward", "train", "sync", "other"))
    assert shares == pytest.approx(1.0, abs=5 * 5e-4)  # five shares, each rounded to 3 decimals
    assert rows["  train: actor train_step (all mini-batches)"]["mean_s"] == 0.75
    assert rows["  train: of which forward+backward"]["share"] == 0.125
    assert rows["  train: the rest (old/reference log-prob recompute, Ray calls)"]["mean_s"] == 0.25  # 1.0 - 0.75
    with pytest.raises(ValueError, match="need more than skip=4"):
        step_breakdown(str(path), skip=4)

    # a step that kept no group logs no time/train: it counts with zero train time, and the total row says so
    records.append({"step": 5, "time/rollout": 2.0, "time/reward": 0.5, "time/other": 0.5, "time/step": 3.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {r["part"]: r for r in step_breakdown(str(path), skip=1)}
    assert rows["step (total; 1 of 4 steps made no update)"]["mean_s"] == 3.75
    assert rows["train"]["mean_s"] == 0.75
    with pytest.raises(ValueError, match="none of the 1 measured steps .* made an update"):
        step_breakdown(str(path), skip=4)


def test_spread_lengths():
    from megatron_rl.benchmarks.train import spread_lengths

    assert spread_lengths(4, 100, 1) == [100] * 4
    lengths = spread_lengths(8, 512, 10)
    assert lengths[0] == 51 and lengths[-1] == 512 and lengths == sorted(lengths)
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
    assert 0.44 < padding < 0.46  # the "about half of the padded tokens are padding" case
    with pytest.raises(ValueError, match="spread must be >= 1"):
        spread_lengths(4, 100, 0.5)


def test_matmul_parameters_match_the_linear_layers_of_the_hf_model(tiny_model):
    """The MFU numerator counts exactly the weights of the model's nn.Linear layers (incl. the LM head)."""
    from transformers import AutoModelForCausalLM

    from megatron_rl.benchmarks.gpu import matmul_parameters, train_step_flops
    from megatron_rl.models.qwen_arch import load_arch

    path = tiny_model("qwen3", num_layers=2, hidden_size=64, head_dim=32, num_attention_heads=4, num_kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    arch = load_arch(path)
    assert matmul_parameters(arch) == linear
    # one sequence of 10 tokens: 6 * P * 10 dense + 6 * layers * heads * head_dim * 10^2 attention
    assert train_step_flops([10], arch) == 6 * linear * 10 + 6 * 2 * 4 * 32 * 100


def test_train_benchmark_runs_every_variant_in_one_process(tiny_model):
    """The smallest real run: the actor switches between packed and padded batches in one process, and the rows
    count padding as the layouts imply (packed: none; padded: up to each micro-batch's longest sequence)."""
    from megatron_rl.benchmarks.models import vocab_size
    from megatron_rl.benchmarks.train import train_rows

    path = tiny_model("qwen3", hidden_size=64, head_dim=32)
    out = train_rows(path, vocab=vocab_size(path), seq_len=32, num_sequences=4, spreads=(4,), steps=1, warmup=0,
                     threads=1)
    runs = {r["variant"]: r for r in out["runs"]}
    assert list(runs) == ["pytorch (transformers + AdamW), 1x spread", "actor padded, 1x spread",
                          "actor packed, 1x spread", "actor padded, 4x spread", "actor packed, 4x spread"]
    assert all(r["model_tokens"] == r["real_tokens"] for name, r in runs.items() if "packed" in name or "1x" in name)
    padded = runs["actor padded, 4x spread"]
    assert padded["real_tokens"] == sum([8, 16, 24, 32]) and padded["model_tokens"] > padded["real_tokens"]
    assert padded["padding_frac"] == round(1 - padded["real_tokens"] / padded["model_tokens"], 3)
    assert [r["comparison"].split(",")[0] for r in out["ratios"]] == [
        "actor (packed) / plain PyTorch", "actor (padded) / plain PyTorch", "packed / padded", "packed / padded"]
    for r in out["ratios"]:  # speed ratio = reference time / our time, from the same rows
        ours, ref = (runs["actor packed, 4x spread"], runs["actor padded, 4x spread"]) if "4x" in r["comparison"] \
            else (None, None)
        if ours is not None:
            assert r["fwd_bwd speed ratio (min)"] == round(ref["fwd_bwd_s min"] / ours["fwd_bwd_s min"], 3)
    assert out["profiles"] == {}


def test_run_training_refuses_a_used_folder_and_reports_a_failed_run(tmp_path):
    """The step benchmark's training run: an existing run is never overwritten, and a run that fails says why
    (the tail of its log) instead of a breakdown of nothing."""
    from megatron_rl.benchmarks.step import run_training

    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_training(str(used), steps=1)
    with pytest.raises(RuntimeError, match="(?s)exit 2.*algorithm.mini_batches"):
        run_training(str(tmp_path / "bad"), steps=1, overrides=["algorithm.mini_batches=0"], timeout_s=300)


def test_generated_lengths_count_up_to_and_including_the_first_eos():
    """transformers keeps stepping finished rows (padding after EOS): only tokens up to the first EOS count."""
    from megatron_rl.benchmarks.rollout import generated_lengths

    prompt = [7, 7]
    out = torch.tensor([prompt + [5, 2, 0, 0],    # EOS (2) at the second new token
                        prompt + [5, 6, 8, 9],    # no EOS: every new token
                        prompt + [2, 2, 0, 0]])   # EOS first: 1 token
    assert generated_lengths(out, 2, eos_token_id=2).tolist() == [2, 4, 1]
    assert generated_lengths(out, 2, eos_token_id=None).tolist() == [4, 4, 4]


def test_bucketed_keeps_order_and_size_limit_and_memcpy_floor():
    from megatron_rl.benchmarks.sync import bucketed, memcpy_seconds

    state = {"a": torch.zeros(4), "b": torch.zeros(4), "big": torch.zeros(64), "c": torch.zeros(2)}  # fp32 bytes
    buckets = bucketed(state, bucket_bytes=32)
    assert [[name for name, _ in b] for b in buckets] == [["a", "b"], ["big"], ["c"]]  # 16+16; 256 alone; 8
    assert [name for b in buckets for name, _ in b] == list(state)  # every tensor once, in order
    assert bucketed(state, bucket_bytes=1 << 20) == [list(state.items())]
    assert 0 < memcpy_seconds(state, repeats=2) < 1.0


# ---- the measuring subcommands end to end on the smallest settings (real vLLM engines, a real Ray cluster) ----
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
def test_rollout_and_sync_subcommands_end_to_end(bench, tmp_path, capsys):
    """`rollout` and `sync` on the tiny model: every table row is there, the counts are sane, and the pool
    generates the same number of tokens per second order as the bare engine it wraps (same prompts and seeds)."""
    rows = _one_table(bench, tmp_path, ["rollout", "--size", "tiny", "--batch-sizes", "2,4", "--n", "2", "--max-tokens",
                                        "8", "--repeats", "1", "--num-cpus", "1", "--workdir", str(tmp_path)])
    assert [(r["engines"], r["prompts x n"]) for r in rows] == [(1, "2 x 2"), (1, "4 x 2")]
    for r in rows:
        assert r["bare_tok_s"] > 0 and r["pool_tok_s"] > 0 and r["hf_tok_s"] > 0
        # 1 engine: pool/bare is the pool's overhead; a factor 5 either way would mean a broken measurement
        assert 0.2 < r["pool/bare"] < 5, r

    rows = _one_table(bench, tmp_path, ["sync", "--sizes", "tiny", "--engines", "1", "--bucket-mib", "0.5,64",
                                        "--repeats", "1", "--num-cpus", "1", "--workdir", str(tmp_path)])
    assert [(r["transport"], r["bucket_MiB"]) for r in rows] == [("gloo", 0.5), ("gloo", 64.0),
                                                                 ("object_store", 0.5), ("object_store", 64.0)]
    assert {r["model"] for r in rows} == {"qwen3_tiny"}
    assert rows[0]["buckets"] > rows[1]["buckets"] == 1  # ~0.8 MiB of weights: two 0.5 MiB buckets, or one
    for r in rows:
        assert r["sync_s"] > 0 and r["memcpy_s"] > 0 and r["vllm_reload_s"] > 0
        # the ratio is taken before the table rounds memcpy_s to 1e-5 s (~4e-5 s here: up to 12.5% off)
        assert r["sync/memcpy"] == pytest.approx(r["sync_s"] / r["memcpy_s"], rel=0.15)
    assert "Weight sync per transport" in capsys.readouterr().out

    rows = _one_table(bench, tmp_path, ["refit", "--sizes", "tiny", "--layouts", "pp2", "--engines", "1",
                                        "--bucket-mib", "0.25", "--repeats", "1", "--workdir", str(tmp_path)])
    assert [(r["actor"], r["engines"], r["sender"]) for r in rows] == [("pp2", 1, "driver"), ("pp2", 1, "owners")]
    for r in rows:
        assert r["sync_s"] > 0 and r["slowest_engine_s"] > 0 and r["driver/this"] > 0
    assert rows[0]["driver/this"] == 1.0

    rows = _one_table(bench, tmp_path, ["refit", "--colocate", "--sizes", "tiny", "--layouts", "pp2", "--bucket-mib",
                                        "0.25", "--repeats", "1", "--workdir", str(tmp_path)])
    assert [(r["actor"], r["engines"], r["transport"]) for r in rows] == [("pp2", 2, "gloo"), ("pp2", 2, "ipc")]
    for r in rows:
        assert r["sync_s"] > 0 and r["slowest_engine_s"] > 0 and r["gloo/this"] > 0
    assert rows[0]["gloo/this"] == 1.0


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
def test_step_subcommand_end_to_end(bench, tmp_path):
    """`step` trains the quickstart (made short) and breaks its steps down: the parts add up to the step."""
    # a short warm-up and small steps; every step trains (one round, topped up with zero-advantage groups)
    rows = _one_table(bench, tmp_path, ["step", "--steps", "3", "--skip", "1", "--workdir", str(tmp_path),
                                        "warmup.steps=3", "algorithm.prompts_per_step=4",
                                        "algorithm.dynamic_sampling.max_rounds=1",
                                        "algorithm.dynamic_sampling.on_cap=top_up",
                                        "algorithm.dynamic_sampling.top_up_with_zero_advantage=true"])
    by_part = {r["part"]: r for r in rows}
    assert by_part["train"]["mean_s"] > 0 and by_part["sync"]["mean_s"] > 0
    parts = sum(by_part[p]["mean_s"] for p in ("rollout", "reward", "train", "sync", "other"))
    assert parts == pytest.approx(by_part["step (total)"]["mean_s"], rel=0.01, abs=5e-4)  # each rounded to 1e-4
    assert 0 < by_part["  train: of which forward+backward"]["mean_s"] <= by_part["train"]["mean_s"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
def test_startup_subcommand_end_to_end(bench, tmp_path):
    """`startup` runs the real console command and finds every phase in its output; the phases add up to the total
    and the first RL step is not counted among the fixed costs twice."""
    rows = _one_table(bench, tmp_path, ["startup", "--steps", "2", "--workdir", str(tmp_path), "warmup.steps=3",
                                        "algorithm.prompts_per_step=4"])
    seconds = {r["phase"]: r["seconds"] for r in rows}
    for phase in ("python start, imports, config load and check", "tiny model, data, reward workers, Ray start",
                  "Megatron ranks start (engines start in the background)",
                  "supervised warm-up (beside the starting engines)",
                  "first weight sync (waits for the engines) + first evaluation", "first RL step",
                  "  of which checkpoint at step 1 (as printed)", "shutdown (engines, ranks, reward workers, Ray)",
                  "process exit"):
        assert seconds[phase] >= 0, phase
    parts = sum(s for p, s in seconds.items() if not p.startswith(("  of which", "total")))
    assert parts == pytest.approx(seconds["total (wall clock of the command)"], abs=0.1)
