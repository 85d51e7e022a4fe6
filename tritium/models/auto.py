"""tritium.models.load: a Hugging Face checkpoint (local folder or hub repository) as a
compact tritium model, by its config.json's model_type."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from tritium.models import bert_generation, bigbird_pegasus, gemma2, glm4, mvp, parallel, sharding
from tritium.models.attention import check_backend
from tritium.models.checkpoint import Reader, listed, load_weights, weight_files
from tritium.models.config import ids, read_json
from tritium.models.decoder import DecoderLM
from tritium.models.hub import CheckpointFiles

MODEL_TYPES = {
    "gemma2": (gemma2.config_from_hf, gemma2.Gemma2ForCausalLM),
    "gemma3_text": (gemma2.config_from_hf, gemma2.Gemma2ForCausalLM),
    "glm4": (glm4.config_from_hf, glm4.Glm4ForCausalLM),
    "mvp": (mvp.config_from_hf, mvp.MvpForConditionalGeneration),
    "bigbird_pegasus": (bigbird_pegasus.config_from_hf, bigbird_pegasus.BigBirdPegasusForConditionalGeneration),
    "bert-generation": (bert_generation.config_from_hf, bert_generation.model_class),
    "encoder-decoder": (bert_generation.config_from_hf, bert_generation.model_class),
}
# model_type -> (config.json -> config, the model class or a function of config.json giving it)
WARM_START_TYPES = ("bert", "roberta")  # checkpoints a class with a WARM_START also takes


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load(path_or_repo_id: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
         device: torch.device | str | None = None, attn_implementation: str = "tritium",
         quantization: str | None = None, revision: str | None = None, allow_pickle: bool = False,
         model_class: type | None = None, config_overrides: dict | None = None, tp: bool = False,
         device_mesh=None):
    """Load a checkpoint as a tritium model, in eval mode.

    path_or_repo_id: a folder holding config.json and safetensors weights (one file, or
        shards with model.safetensors.index.json), or a hub repository id, read through
        huggingface_hub's cache (HF_HUB_OFFLINE=1 uses the cache only; nothing but
        config.json and the weight files is downloaded).
    dtype: the model's floating dtype; device: where its weights go (default: the current
        CUDA device, else the CPU). The model is built on the meta device and each tensor
        is read straight to `device` in `dtype`.
    attn_implementation: "tritium", "sdpa" or "eager" (see model.set_attn_implementation).
    quantization: None, or "nf4" to quantize every linear layer of the decoder layers at
        load (bitsandbytes' NF4, blocksize 64, the LM head and embeddings stay dense). A
        bitsandbytes NF4 checkpoint loads as it is, with or without it.
    allow_pickle: read pickle weights (pytorch_model.bin), which can run code; refused
        otherwise.
    model_class: the class to load into; default: the one config.json's model_type names.
        A class with a WARM_START (BertGenerationEncoder/Decoder) also takes a plain BERT or
        RoBERTa checkpoint, as transformers' warm starts do: the tensors it has no use for
        are named in a warning, the ones it adds (a decoder's cross-attention) are
        initialized as transformers initializes them, also named in a warning.
    config_overrides: config.json fields to set before the model is built (e.g.
        add_cross_attention=True, is_decoder=True, bos_token_id=101).
    tp: tensor parallelism over torch.distributed's default group (every process of a
        `torchrun --nproc-per-node N` run calls load alike; the group is initialized from
        torchrun's environment if it is not yet: NCCL with GPUs, gloo without). Each rank
        builds its part (attention heads, MLP features and vocabulary rows split, see
        tritium/models/parallel.py), reads only that part of each safetensors tensor, and
        quantizes it with quantization="nf4"; its device defaults to cuda:LOCAL_RANK. The
        ranks then run forward and generate alike, with the same inputs, and all get the
        whole logits. device_mesh: a 1-D DeviceMesh to shard over instead (implies tp).

    Returns the model (model.config is its DecoderConfig). Raises ValueError for an
    unknown model_type and for a checkpoint whose tensors do not fit its config (every
    missing, unexpected and mis-shaped one named), FileNotFoundError for a missing file.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if quantization not in (None, "nf4"):
        raise ValueError(f"quantization: expected None or 'nf4', got {quantization!r}")
    files = CheckpointFiles(path_or_repo_id, revision)
    raw = {**read_json(files.get("config.json")), **(config_overrides or {})}
    model_type = raw.get("model_type")
    warm = getattr(model_class, "WARM_START", None) if model_type in WARM_START_TYPES else None
    if warm is not None:  # a plain BERT/RoBERTa checkpoint, warm-starting a BertGeneration half
        model_type = "bert-generation"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{files.name}: model_type {model_type!r} has no compact tritium model; supported: "
                         f"{sorted(MODEL_TYPES)}")
    config_from_hf, default_class = MODEL_TYPES[model_type]
    config = config_from_hf(raw)
    if model_class is None:
        model_class = default_class if isinstance(default_class, type) else default_class(raw)
    # transformers' generate stops on generation_config.json's eos ids (Gemma 2: <eos> and
    # <end_of_turn>), which may be more than config.json's.
    generation = read_json(files.get("generation_config.json", required=False))
    if generation.get("eos_token_id") is not None:
        config.eos_token_ids = ids(generation["eos_token_id"])
    for key in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        if generation.get(key) is not None and hasattr(config, key):
            setattr(config, key, generation[key])
    check_backend(attn_implementation, config.attn_softcap)
    group = parallel.process_group(tp, device_mesh)
    device = torch.device(device) if device is not None else (
        parallel.local_device() if group is not None else default_device())
    renames = getattr(model_class, "CHECKPOINT_RENAMES", ())
    unused = getattr(model_class, "UNUSED_KEYS", ())
    if warm is not None:
        renames, unused = (*warm.renames, *renames), (*unused, *warm.unused)
    reader = Reader(weight_files(files, allow_pickle=allow_pickle), device, renames, unused)
    if reader.unused:
        warnings.warn(f"{files.name}: {len(reader.unused)} tensors of the checkpoint are not used by "
                      f"{model_class.__name__}: {listed(reader.unused)}",
                      stacklevel=2)
    if hasattr(model_class, "fit_checkpoint"):
        config = model_class.fit_checkpoint(config, reader.shapes.keys())
    quantized = quantization == "nf4" or _is_nf4(raw)
    if quantized and not issubclass(model_class, DecoderLM):
        raise ValueError(f"quantization: NF4 is for the decoder-only models, not {model_type}")
    options = dict(quantization="nf4") if quantized else {}
    model = model_class(config, dtype=dtype, device="meta", **options)
    dense = model_class(config, dtype=dtype, device="meta") if quantized or group else model
    slices = None
    if group is not None and dist.get_world_size(group) > 1:
        if _is_nf4(raw):
            raise ValueError(f"{files.name}: an NF4 checkpoint cannot be split for tensor parallelism (its blocks "
                             "span the whole tensor); load the float checkpoint with quantization='nf4', which "
                             "quantizes each rank's part")
        tp_state = parallel.TensorParallel.of(group, config.vocab_size)
        slices = sharding.shard(model, tp_state)
    new = load_weights(model, dense, reader, name=files.name, dtype=dtype, quantize=quantization == "nf4",
                       fresh=warm.fresh if warm is not None else (), init_std=float(raw.get("initializer_range", 0.02)),
                       slices=slices)
    if slices is not None:
        sharding.sum_kv_copies(model, tp_state)
    if new:
        warnings.warn(f"{files.name}: {len(new)} tensors of {model_class.__name__} are not in the checkpoint and were "
                      f"initialized (train before use): {listed(new)}",
                      stacklevel=2)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def _is_nf4(raw: dict) -> bool:
    """Whether config.json says the checkpoint is bitsandbytes NF4 (transformers writes
    its quantization_config)."""
    quant = raw.get("quantization_config") or {}
    if not quant:
        return False
    if quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit") or (
            quant.get("bnb_4bit_quant_type", "fp4") != "nf4"):
        raise ValueError(f"config.json: quantization_config {quant} is not bitsandbytes 4-bit NF4, the one quantized "
                         "format tritium reads")
    return True
