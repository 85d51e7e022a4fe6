"""The compact decoders (tritium.models) against transformers: tiny random Gemma 2, Gemma 3
text and GLM-4 models built in transformers, saved with save_pretrained, loaded with
tritium.models.load.

Both sides run float32; they differ by summation order only, so logits agree to 1e-4 of
their scale (test_hf.assert_logits_close). Generation is compared step by step: each
step's logits and the tokens, against transformers' generate."""

import json
import subprocess
import sys
import warnings

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf import DECODER, assert_logits_close, gemma2, glm4, padded_batch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import tritium.models
from tritium.models.checkpoint import SAFETENSORS


def gemma3():
    """Gemma 3 text: q/k norms, local and global rope bases that differ, layers of both
    types (every other one sliding), no softcaps."""
    config = Gemma3TextConfig(**DECODER, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                              query_pre_attn_scalar=16, initializer_range=0.2, rope_theta=1000.0,
                              rope_local_base_freq=50.0)
    return Gemma3ForCausalLM(config)


FAMILIES = {"gemma2": gemma2, "gemma3": gemma3, "glm4": glm4}
SOFTCAPPED = {"gemma2"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (transformers model, the folder it was saved to)."""
    saved = {}
    for name, factory in FAMILIES.items():
        torch.manual_seed(1)
        model = factory().eval()
        model.set_attn_implementation("eager")
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        saved[name] = (model, folder)
    return saved


def backends(family):
    return ["tritium", "eager"] + ([] if family in SOFTCAPPED else ["sdpa"])


@pytest.mark.parametrize("family,backend", [(f, b) for f in FAMILIES for b in backends(f)])
def test_logits_padded_batch(checkpoints, family, backend):
    hf, folder = checkpoints[family]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation=backend)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
    assert got.shape == expected.shape
    assert_logits_close(expected, got, valid=mask)


def assert_same_generation(ours, theirs):
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.logits) == len(theirs.logits)
    for mine, reference in zip(ours.logits, theirs.logits):
        assert_logits_close(reference, mine)


def assert_generates_as_transformers(ours, hf, ids, mask, new_tokens: int, **options):
    """Our generate and transformers' with the same options: tokens and every step's logits."""
    got = ours.generate(ids, new_tokens, attention_mask=mask, return_logits=True, **options)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, **options)
    assert_same_generation(got, expected)
    return got


@pytest.mark.parametrize("family,backend", [("gemma2", "tritium"), ("glm4", "tritium"), ("gemma2", "eager")])
def test_training_step_as_transformers(checkpoints, family, backend):
    """A right-padded batch with labels (-100 on the padding), as training pads: the loss,
    through the fused LM head + softcap + cross-entropy on the tritium backend (no logits
    unless asked), and the gradients of the embeddings, a layer and the final norm, as
    transformers'. (Left padding would put a padded position's prediction, which no two
    implementations define alike, in the loss.)"""
    hf, folder = checkpoints[family]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation=backend).train()
    ids, mask = padded_batch(seqlen=9, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    got = ours(ids, mask, labels=labels)
    assert got.logits is None
    hf.train()
    expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
    hf.zero_grad()
    expected.loss.backward()
    got.loss.backward()
    hf.eval()
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        mine, theirs = ours.get_parameter(name).grad, hf.get_parameter(name).grad
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), name
    with torch.no_grad():
        both = ours(ids, mask, labels=labels, return_logits=True)
    assert_logits_close(hf(input_ids=ids, attention_mask=mask).logits, both.logits, valid=mask)


@pytest.mark.parametrize("family,backend", [("gemma2", "tritium"), ("gemma3", "tritium"), ("glm4", "tritium"),
                                            ("gemma3", "sdpa")])
def test_greedy_generation_step_by_step(checkpoints, family, backend):
    """A left-padded batch of two: prefill through the flash kernel, then decode through
    the KV-cache kernel; every step's logits and token as transformers'."""
    hf, folder = checkpoints[family]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation=backend)
    ids, mask = padded_batch(seqlen=9)
    got = ours.generate(ids, 6, attention_mask=mask, eos_token_id=[], return_logits=True)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    assert_same_generation(got, expected)


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=2, length_penalty=0.5, no_repeat_ngram_size=2,
                                                                early_stopping=True)])
def test_beam_search_as_transformers(checkpoints, options):
    """Beam search in a padded batch: the returned beams and every step's logits (all
    beams, in the order they ran) as transformers'; with an eos the model reaches, so beams
    finish at different lengths."""
    hf, folder = checkpoints["glm4"]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation="eager")
    ids, mask = padded_batch(seqlen=7)
    free = ours.generate(ids, 5, attention_mask=mask, eos_token_id=[])
    assert_generates_as_transformers(ours, hf, ids, mask, 5, eos_token_id=[int(free[0, 9])], pad_token_id=0, **options)


def test_rows_stop_at_any_eos(checkpoints):
    """GLM-4 stops on any of several eos ids; a finished row is padded while the other
    goes on, as transformers does."""
    hf, folder = checkpoints["glm4"]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu")
    ids, mask = padded_batch(seqlen=9)
    free = ours.generate(ids, 5, attention_mask=mask, eos_token_id=[])
    eos = [int(free[0, 10]), 99 if int(free[0, 10]) != 99 else 98]  # row 0 stops at its second new token
    got = assert_generates_as_transformers(ours, hf, ids, mask, 5, eos_token_id=eos, pad_token_id=0)
    assert got.sequences[0, 11:].eq(0).all() and not torch.equal(got.sequences, free)


def test_sampling_as_transformers(checkpoints):
    """temperature, top-k and top-p in transformers' order, drawn from the same seed."""
    hf, folder = checkpoints["gemma3"]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation="eager")
    ids, mask = padded_batch(seqlen=6)
    options = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    got = ours.generate(ids, 4, attention_mask=mask, eos_token_id=[], **options)
    torch.manual_seed(5)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0, **options)
    assert torch.equal(got, expected)
    generator = torch.Generator().manual_seed(3)
    again = [ours.generate(ids, 4, attention_mask=mask, eos_token_id=[], generator=generator.manual_seed(3),
                           **options) for _ in range(2)]
    assert torch.equal(*again)


def test_sharded_checkpoint(checkpoints, tmp_path):
    hf, _ = checkpoints["glm4"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = tritium.models.load(tmp_path, dtype=torch.float32, device="cpu")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_logits_close(hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask).logits, valid=mask)


def rewrite(folder, change):
    """Apply change(state dict) to the checkpoint in `folder`."""
    state = load_file(folder / SAFETENSORS)
    change(state)
    save_file(state, folder / SAFETENSORS, metadata={"format": "pt"})


def copy_of(checkpoints, family, tmp_path):
    _, folder = checkpoints[family]
    tmp_path.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_checkpoint_that_does_not_fit_names_every_tensor(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "glm4", tmp_path)

    def change(state):
        del state["model.layers.0.self_attn.q_proj.bias"]
        state["model.layers.0.extra.weight"] = torch.zeros(2)
        state["model.norm.weight"] = torch.zeros(3)

    rewrite(folder, change)
    with pytest.raises(ValueError) as error:
        tritium.models.load(folder, dtype=torch.float32, device="cpu")
    message = str(error.value)
    for part in ("1 missing: model.layers.0.self_attn.q_proj.bias", "1 unexpected: model.layers.0.extra.weight",
                 "model.norm.weight (3,) (expected (64,))"):
        assert part in message


def test_pickle_needs_opt_in(checkpoints, tmp_path):
    hf, _ = checkpoints["gemma2"]
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        tritium.models.load(tmp_path, dtype=torch.float32, device="cpu")
    ours = tritium.models.load(tmp_path, dtype=torch.float32, device="cpu", allow_pickle=True)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_logits_close(hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask).logits, valid=mask)


def test_clear_errors(checkpoints, tmp_path, monkeypatch):
    _, folder = checkpoints["gemma2"]
    with pytest.raises(ValueError, match="SDPA cannot"):
        tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="SDPA cannot"):
        ours.set_attn_implementation("sdpa")
    assert ours.attn_implementation == "tritium"
    ids = torch.randint(3, 100, (2, 60))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(ids, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids[:, :5], 2, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="holds 1 sequences"):
        ours(ids[:, :5], cache=ours.new_cache(1, 8))
    with pytest.raises(ValueError, match="do not fit"):
        ours(ids[:, :5], cache=ours.new_cache(2, 4))

    other = copy_of(checkpoints, "gemma2", tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        tritium.models.load(other)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        tritium.models.load("tritium-tests/not-cached")



def test_offline_from_the_hub_cache(checkpoints, tmp_path, monkeypatch):
    """A repository id resolves through huggingface_hub's cache, offline, optional files
    (the shard index) included."""
    _, folder = checkpoints["gemma3"]
    repo = tmp_path / "models--tritium-tests--tiny-gemma3"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", SAFETENSORS):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ours = tritium.models.load("tritium-tests/tiny-gemma3", dtype=torch.float32, device="cpu")
    assert ours.config.model_type == "gemma3_text" and not ours.model.norm.weight.is_meta


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj")


def bnb_nf4(state: dict, double_quant: bool) -> dict:
    """bitsandbytes' own NF4 of every decoder linear weight of `state`: the quantized
    state dict (as transformers saves a 4-bit model) and the dequantized weights."""
    import bitsandbytes.functional as bnbf

    packed, dequantized = {}, {}
    for key, w in state.items():
        if key.endswith(".weight") and any(f".{name}." in key for name in LINEARS):
            codes, quant_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                    compress_statistics=double_quant)
            packed[key] = codes
            packed.update({f"{key}.{k}": v for k, v in quant_state.as_dict(packed=True).items()})
            dequantized[key] = bnbf.dequantize_4bit(codes, quant_state)
        else:
            packed[key] = w
    return packed, dequantized


def dequantized_twin(hf, dequantized: dict):
    twin = type(hf)(hf.config).eval()
    twin.load_state_dict({**hf.state_dict(), **dequantized})
    return twin.eval()


@pytest.mark.parametrize("family", ["gemma2", "glm4"])
def test_nf4_quantized_at_load(checkpoints, family):
    """quantization="nf4" on a float checkpoint: every decoder linear is bitsandbytes' NF4
    of its weight; the reference is transformers' model with bitsandbytes' dequantized
    weights."""
    hf, folder = checkpoints[family]
    _, dequantized = bnb_nf4(hf.state_dict(), double_quant=False)
    ours = tritium.models.load(folder, dtype=torch.float32, device="cpu", quantization="nf4")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, tritium.nf4.NF4Linear)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = dequantized_twin(hf, dequantized)(input_ids=ids, attention_mask=mask).logits
        assert_logits_close(expected, ours(ids, mask).logits, valid=mask)
        assert (expected - hf(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-2  # NF4 is not a no-op


def test_nf4_checkpoint_loads_as_is(checkpoints, tmp_path):
    """A bitsandbytes NF4 checkpoint (double quantization, config.json's
    quantization_config) loads with no option and computes with bitsandbytes' weights."""
    hf, _ = checkpoints["gemma3"]
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    packed, dequantized = bnb_nf4(state, double_quant=True)
    save_file(packed, tmp_path / SAFETENSORS, metadata={"format": "pt"})
    config = json.loads(hf.config.to_json_string())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = tritium.models.load(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.model.layers[1].mlp.down_proj.quantized.double_quant
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = dequantized_twin(hf, dequantized)(input_ids=ids, attention_mask=mask).logits
        assert_logits_close(expected, ours(ids, mask).logits, valid=mask)


def test_runs_without_transformers(checkpoints):
    """Loading and generating need no transformers: a fresh interpreter in which importing
    it fails."""
    _, folder = checkpoints["glm4"]
    script = f"""
import sys
sys.modules["transformers"] = None  # any import of it raises ImportError
import torch, tritium.models
model = tritium.models.load({str(folder)!r}, dtype=torch.float32, device="cpu")
out = model.generate(torch.tensor([[5, 6, 7]]), 2)
assert out.shape == (1, 5), out.shape
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gemma2", "glm4"])
def test_cuda_graph_decode_matches_eager_steps(checkpoints, family):
    """The captured decode step gives every step's logits as the eager step does."""
    _, folder = checkpoints[family]
    ours = tritium.models.load(folder, dtype=torch.float32, device="cuda")
    ids, mask = padded_batch(seqlen=9)
    ids, mask = ids.cuda(), mask.cuda()
    eager = ours.generate(ids, 8, attention_mask=mask, eos_token_id=[], cuda_graph=False, return_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that fell back to eager steps warns
        graphed = ours.generate(ids, 8, attention_mask=mask, eos_token_id=[], cuda_graph=True, return_logits=True)
    assert torch.equal(eager.sequences, graphed.sequences)
    for a, b in zip(eager.logits, graphed.logits):
        assert_logits_close(a, b)



@pytest.mark.parametrize("family", ["gemma2", "glm4"])
def test_bfloat16_as_accurate_as_transformers(checkpoints, family):
    """In bfloat16 the logits stay within twice transformers' own bfloat16 error (both
    against transformers in float64) plus a floor."""
    hf, folder = checkpoints[family]
    ids = torch.randint(3, 100, (2, 14))
    ours = tritium.models.load(folder, dtype=torch.bfloat16, device="cpu")
    with torch.no_grad():
        exact = type(hf)(hf.config).double().eval()
        exact.load_state_dict(hf.state_dict())
        reference = exact(input_ids=ids).logits
        half = type(hf)(hf.config).to(torch.bfloat16).eval()
        half.load_state_dict(hf.state_dict())
        half.set_attn_implementation("eager")
        theirs = (half(input_ids=ids).logits.double() - reference).abs().max().item()
        mine = (ours(ids).logits.double() - reference).abs().max().item()
    assert mine <= 2 * theirs + 1e-3 * reference.abs().max().item()


def word_tokenizer(folder):
    """A word-level tokenizer.json over the tiny models' 100 ids ("<pad>", "<bos>", "<eos>",
    then "w3" .. "w99"), adding bos, with its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def test_generate_command(checkpoints, tmp_path):
    """`tritium generate` streams the continuation, then reports the times."""
    folder = copy_of(checkpoints, "glm4", tmp_path)
    word_tokenizer(folder)
    run = subprocess.run([sys.executable, "-m", "tritium.cli", "generate", str(folder), "w5 w6 w7",
                          "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model = tritium.models.load(folder, dtype=torch.float32, device="cpu")
    expected = model.generate(torch.tensor([[1, 5, 6, 7]]), 4)[0, 4:].tolist()
    assert len(expected) == 4  # no eos on the way: all four steps are timed
    assert run.stdout.startswith("w5 w6 w7")
    assert " ".join(f"w{i}" for i in expected if i >= 3) in run.stdout
    for part in ("prefill:", "warm-up:", "decode: 2 steps", "tokens/s", "GB/s"):
        assert part in run.stderr


# config.json as the hub's checkpoints hold them (written before transformers 5: rope
# fields at the top level), trimmed to what differs from the defaults.
HUB_CONFIGS = {
    "gemma-3-1b": {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
                   "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                   "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
                   "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
                   "max_position_embeddings": 32768, "query_pre_attn_scalar": 256},
    "gemma-3-4b-text": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
                        "vocab_size": 262208},
    "gemma-2-2b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rope_theta": 10000.0,
                   "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 256000, "eos_token_id": 1},
    "glm-4-9b-0414": {"model_type": "glm4", "hidden_size": 4096, "intermediate_size": 13696,
                      "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
                      "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "vocab_size": 151552,
                      "max_position_embeddings": 32768, "eos_token_id": [151329, 151336, 151338]},
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_config_formats(name):
    """Our reading of a hub config.json agrees with transformers' (rope per layer type,
    layer types, rotary dim, softcaps, eos ids)."""
    from transformers import AutoConfig

    raw = HUB_CONFIGS[name]
    theirs = AutoConfig.for_model(**raw)
    ours = tritium.models.MODEL_TYPES[raw["model_type"]][0](dict(raw))
    assert ours.layer_types == list(getattr(theirs, "layer_types", None) or ours.layer_types)
    params = theirs.rope_parameters
    for layer_type in set(ours.layer_types):
        spec = params.get(layer_type, params)
        assert ours.rope[layer_type].theta == spec["rope_theta"]
        assert ours.rope[layer_type].factor == (spec.get("factor", 1.0) if spec.get("rope_type") == "linear" else 1.0)
    assert ours.rotary_dim == int(theirs.head_dim * params.get("partial_rotary_factor", 1.0))
    assert ours.attn_softcap == (getattr(theirs, "attn_logit_softcapping", None) or 0.0)
    assert ours.final_softcap == (getattr(theirs, "final_logit_softcapping", None) or 0.0)
    assert ours.eos_token_ids == ([theirs.eos_token_id] if isinstance(theirs.eos_token_id, int) else theirs.eos_token_id)
    assert ours.softmax_scale == pytest.approx(getattr(theirs, "query_pre_attn_scalar", theirs.head_dim) ** -0.5)
