"""Tensor parallelism of the compact models (tritium.models.load(..., tp=True)) and FSDP2
training, on two CPU processes with gloo, against one process.

Tiny transformers checkpoints that exercise each way of splitting: Gemma 2 with one kv
head (replicated on both ranks) and a vocabulary of 101 (the second rank's slice padded),
GLM-4 with 6 heads and 3 kv heads (rank 0's heads 0-2 read kv heads 0, 0, 1: a copy per
query head) and q/k/v biases, MVP with task prompts in both stacks and biases on the
row-parallel projections, and bert2bert (two embedding tables, an LM-head bias).
Each rank must give one process's logits, generation (tokens and every step's logits; the
decoders and MVP), loss and, for each parameter, its part of the gradient (float32:
summation order only, 1e-4 of scale)."""

import subprocess
import sys

import pytest
import torch
from distributed import run_ranks, saved_checkpoints
from safetensors.torch import load_file
from test_hf import DECODER, assert_logits_close, padded_batch
from test_models import word_tokenizer
from test_models_seq2seq import bert2bert, mvp_encoder_prompts, source_batch
from transformers import Gemma2Config, Gemma2ForCausalLM, Glm4Config, Glm4ForCausalLM

import tritium.models
import tritium.nf4
from tritium.models import sharding
from tritium.models.parallel import TensorParallel, head_split, split

WORLD = 2


def gemma2():
    config = Gemma2Config(**dict(DECODER, num_key_value_heads=1, vocab_size=101), sliding_window=6,
                          attn_logit_softcapping=2.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                          initializer_range=0.2)
    return Gemma2ForCausalLM(config)


def glm4():
    config = Glm4Config(**dict(DECODER, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96),
                        partial_rotary_factor=0.5, initializer_range=0.2)
    return Glm4ForCausalLM(config)


FAMILIES = {"gemma2": gemma2, "glm4": glm4, "mvp": mvp_encoder_prompts, "bert2bert": bert2bert}
SEQ2SEQ = {"mvp", "bert2bert"}
GENERATED = {"gemma2", "glm4", "mvp"}  # bert2bert's decode is MVP's code


def test_head_split():
    assert [head_split(4, 2, 2, r) for r in range(2)] == [(0, 2, [0]), (2, 4, [1])]
    assert [head_split(4, 1, 2, r) for r in range(2)] == [(0, 2, [0]), (2, 4, [0])]  # replicated
    assert [head_split(6, 3, 2, r) for r in range(2)] == [(0, 3, [0, 0, 1]), (3, 6, [1, 2, 2])]  # a copy per head
    assert [head_split(6, 6, 4, r)[:2] for r in range(4)] == [(0, 1), (1, 3), (3, 4), (4, 6)]  # uneven
    assert [split(14, 4, r) for r in range(4)] == [(0, 3), (3, 7), (7, 10), (10, 14)]
    with pytest.raises(ValueError, match="3 attention heads cannot be split over 4 ranks"):
        head_split(3, 1, 4, 0)


def test_tp_needs_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    torch.manual_seed(0)
    gemma2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not started by torchrun"):
        tritium.models.load(tmp_path, device="cpu", tp=True)


def run(name: str, model) -> dict:
    """What a rank (or the single process) computes: logits, a greedy generation with each
    step's logits, a training step's loss and gradients."""
    torch.manual_seed(0)
    result = {}
    if name in SEQ2SEQ:
        ids, mask = source_batch()
        target = torch.randint(3, 100, (2, 6))
        with torch.no_grad():
            result["logits"] = model(ids, mask, decoder_input_ids=target).logits
        result["valid"] = torch.ones_like(target)
        batch = dict(input_ids=ids, attention_mask=mask, labels=target)
    else:
        ids, mask = padded_batch(seqlen=9)
        with torch.no_grad():
            result["logits"] = model(ids, mask).logits
        result["valid"] = mask
        batch = dict(input_ids=ids, attention_mask=mask.flip(1), labels=ids.masked_fill(mask.flip(1) == 0, -100))
    if name in GENERATED:
        with torch.no_grad():
            generated = model.generate(ids, 2, attention_mask=mask, return_logits=True)
        result["tokens"], result["steps"] = generated.sequences, generated.logits
    model.train()
    loss = model(**batch).loss
    loss.backward()
    result["loss"] = loss.detach()
    result["grads"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return result


def fsdp_step(rank: int, world: int, folder) -> dict:
    """One training step of Gemma 2 under FSDP2 (fully_shard per layer and the model), each
    rank on its row of the batch; the gradients, gathered whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tritium.models.load(folder, dtype=torch.float32, device="cpu").train()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = fsdp_batch()[rank: rank + 1]
    loss = model(ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def fsdp_batch() -> torch.Tensor:
    return torch.randint(3, 100, (WORLD, 9), generator=torch.Generator().manual_seed(5))


def nf4_shard(folder) -> dict:
    """Gemma 2 quantized at load under tensor parallelism: a layer's weight as this rank
    holds it, dequantized, and the logits."""
    model = tritium.models.load(folder, dtype=torch.float32, device="cpu", tp=True, quantization="nf4")
    torch.manual_seed(0)  # run()'s batch
    ids, mask = padded_batch(seqlen=9)
    with torch.no_grad():
        logits = model(ids, mask).logits
    return {"q_proj": tritium.nf4.dequantize(model.model.layers[0].self_attn.q_proj.quantized), "logits": logits}


def worker(rank: int, world: int, folders: dict) -> dict:
    results = {}
    for name, folder in folders.items():
        model = tritium.models.load(folder, dtype=torch.float32, device="cpu", tp=True)
        results[name] = run(name, model)
    results["fsdp"] = fsdp_step(rank, world, folders["gemma2"])
    results["nf4"] = nf4_shard(folders["gemma2"])
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each family's checkpoint folder, and what each rank computed."""
    folders = saved_checkpoints(tmp_path_factory, FAMILIES, seed=7)
    return folders, run_ranks(worker, WORLD, folders)


def assert_part_close(name, got, whole, part):
    expected = whole if part is None else part.take(whole)
    assert got.shape == expected.shape, name
    # 1e-7: float32 noise where the gradient is 0 (a key bias: softmax ignores it)
    assert (got - expected).abs().max() <= 1e-4 * whole.abs().max() + 1e-7, name


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_as_one_process(ranks, family):
    folders, results = ranks
    single = tritium.models.load(folders[family], dtype=torch.float32, device="cpu")
    one = run(family, single)
    for rank, result in enumerate(r[family] for r in results):
        assert result.keys() == one.keys()
        assert torch.equal(result["logits"], results[0][family]["logits"])  # every rank gets the whole logits
        assert_logits_close(one["logits"], result["logits"], valid=one["valid"])
        if "tokens" in one:
            assert torch.equal(result["tokens"], one["tokens"])
            for mine, reference in zip(result["steps"], one["steps"], strict=True):
                assert_logits_close(reference, mine)
        assert abs(result["loss"] - one["loss"]) <= 1e-5 * one["loss"].abs()
        # The slices of this rank (sharding.shard plans without collectives: no group needed).
        plan = sharding.shard(type(single)(single.config, dtype=torch.float32, device="meta"),
                              TensorParallel(None, rank, WORLD, single.config.vocab_size))
        not_here = {n for n, part in plan.items() if part is None}  # row-parallel biases live on rank 0
        assert result["grads"].keys() == one["grads"].keys() - not_here
        for name, grad in result["grads"].items():
            assert_part_close(name, grad, one["grads"][name], plan.get(name))


def test_fsdp2_training_step(ranks):
    folders, results = ranks
    single = tritium.models.load(folders["gemma2"], dtype=torch.float32, device="cpu").train()
    ids = fsdp_batch()
    # FSDP averages the ranks' gradients: each rank's loss is the mean over its own row.
    sum(single(ids[r: r + 1], labels=ids[r: r + 1]).loss for r in range(WORLD)).div(WORLD).backward()
    for name, p in single.named_parameters():
        for result in results:
            assert_part_close(name, result["fsdp"][name], p.grad, None)


def test_nf4_quantized_per_shard(ranks):
    """Each rank quantizes its own rows: bitsandbytes' NF4 of that slice of the float
    weight, bit for bit; the logits are as far from the float model's as one process's
    NF4 model is (its blocks span other rows and columns, so the two differ)."""
    folders, results = ranks
    weight = load_file(folders["gemma2"] / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    rows = weight.shape[0] // WORLD
    for rank, result in enumerate(r["nf4"] for r in results):
        mine = weight[rank * rows: (rank + 1) * rows]
        assert torch.equal(result["q_proj"], tritium.nf4.dequantize(tritium.nf4.quantize(mine)))
    assert torch.equal(results[0]["nf4"]["logits"], results[1]["nf4"]["logits"])
    single = tritium.models.load(folders["gemma2"], dtype=torch.float32, device="cpu", quantization="nf4")
    torch.manual_seed(0)
    ids, mask = padded_batch(seqlen=9)
    with torch.no_grad():
        one = single(ids, mask).logits
    dense = results[0]["gemma2"]["logits"]
    assert (results[0]["nf4"]["logits"] - dense).abs().max() <= 1.5 * (one - dense).abs().max()


def test_generate_command_tp(ranks, tmp_path):
    """`tritium generate --tp 2` starts two processes through torchrun and prints, once,
    the tokens of one process."""
    folders, _ = ranks
    folder = tmp_path / "glm4"
    folder.mkdir()
    for path in folders["glm4"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    word_tokenizer(folder)
    run = subprocess.run([sys.executable, "-m", "tritium.cli", "generate", str(folder), "w5 w6 w7",
                          "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu", "--tp", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr  # whole: the ranks' own errors come before torchrun's summary
    model = tritium.models.load(folder, dtype=torch.float32, device="cpu")
    expected = model.generate(torch.tensor([[1, 5, 6, 7]]), 3)[0, 4:].tolist()
    assert run.stdout.count("w5 w6 w7") == 1
    assert run.stdout.strip() == "w5 w6 w7 " + " ".join(f"w{i}" for i in expected if i >= 3)
    assert "tensor-parallel over 2 processes" in run.stderr and run.stderr.count("decode:") == 1


def test_sliced_reads(tmp_path):
    """The checkpoint reader reads a rank's rows or columns (several runs of them, padded
    with zero rows for a vocabulary slice), from safetensors and from pickle files alike."""
    from safetensors.torch import save_file

    from tritium.models.checkpoint import Reader
    from tritium.models.sharding import Slice

    w = torch.randn(10, 6)
    save_file({"w": w}, tmp_path / "model.safetensors")
    torch.save({"w": w}, tmp_path / "pytorch_model.bin")
    slices = {"rows": Slice(0, ((8, 10),), size=4), "columns": Slice(1, ((0, 2), (4, 6)))}
    expected = {"rows": torch.cat([w[8:], torch.zeros(2, 6)]), "columns": torch.cat([w[:, :2], w[:, 4:]], 1)}
    for path in ("model.safetensors", "pytorch_model.bin"):
        for name, part in slices.items():
            reader = Reader([tmp_path / path], torch.device("cpu"))
            (key, got), = reader.tensors({"w"}, {"w": part})
            assert torch.equal(got, expected[name]), (path, name)


def test_block_sparse_heads_sum_to_the_whole():
    """BigBird-Pegasus' training layout under tensor parallelism: each rank's attention
    (its heads of the random layout, its rows of q/k/v and columns of out_proj, before the
    all-reduce) adds up to the whole module's output. Sharded without a group (the
    collectives are then identities), on the reference backend."""
    from tritium.models.bigbird_layout import random_layout
    from tritium.models.seq2seq import MultiHeadAttention

    torch.manual_seed(0)
    whole = MultiHeadAttention(64, 4, factory={})
    whole.backend = "eager"
    x, mask = torch.randn(2, 128, 64), torch.ones(2, 128, dtype=torch.bool)
    sparse = (16, 1, random_layout(128, block_size=16, num_random_blocks=1, heads=4, seed=3, max_seqlen=256))
    parts = []
    for rank in range(WORLD):
        part = MultiHeadAttention(64, 4, factory=dict(device="meta"))
        plan = sharding.shard(part, TensorParallel(None, rank, WORLD, 100))
        part.load_state_dict({k: plan[k].take(t) if plan.get(k) else t for k, t in whole.state_dict().items()
                              if plan.get(k, True) is not None}, assign=True)
        part.backend = "eager"
        parts.append(part(x, mask=mask, sparse=sparse))
    expected = whole(x, mask=mask, sparse=sparse)
    assert (sum(parts) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not torch.allclose(parts[0], expected, atol=1e-3)  # each rank's part is a part
