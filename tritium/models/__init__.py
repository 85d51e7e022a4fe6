"""Compact model modules, one file per family (Gemma 2 and Gemma 3 text, GLM-4, MVP,
BigBird-Pegasus, BertGeneration), built on tritium's kernels, plus the layers they
share. `load` reads a Hugging Face checkpoint into one, `load_tokenizer` its tokenizer."""

from tritium.models.auto import MODEL_TYPES, load
from tritium.models.bert_generation import BertGenerationDecoder, BertGenerationEncoder, EncoderDecoderModel
from tritium.models.bigbird_pegasus import BigBirdPegasusForConditionalGeneration
from tritium.models.cache import StaticCache
from tritium.models.gemma2 import Gemma2ForCausalLM
from tritium.models.generate import GenerateOutput, generate
from tritium.models.glm4 import Glm4ForCausalLM
from tritium.models.mvp import MvpForConditionalGeneration
from tritium.models.tokenizer import Tokenizer, TokenizerDecodeStream, load_tokenizer

__all__ = ["MODEL_TYPES", "BertGenerationDecoder", "BigBirdPegasusForConditionalGeneration", "BertGenerationEncoder", "EncoderDecoderModel", "GenerateOutput",
           "Gemma2ForCausalLM", "Glm4ForCausalLM", "MvpForConditionalGeneration", "StaticCache", "Tokenizer",
           "TokenizerDecodeStream", "generate", "load", "load_tokenizer"]
