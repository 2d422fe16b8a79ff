"""Shape-faithful miniatures of the paper's models: the real geometry, toy width and depth, random weights.

The tiny stand-ins of :mod:`mllmfl_dist.standins.tiny` are 32-pixel, patch-8 models; the paper's configs run
``llava-hf/llava-1.5-7b-hf`` and open_clip's ``ViT-B-32``. A shape bug between those and the FL side (DWP's
adapter onto a 24 x 24 grid, batched generation over 576 image tokens, the teacher's read-out) shows only with
their geometry, so these builds keep it exactly and shrink only what no shape downstream depends on:

- ``build_llava15_miniature(dir)``: a ``LlavaForConditionalGeneration`` with llava-1.5-7b-hf's geometry
  (its ``config.json`` / ``preprocessor_config.json`` / ``processor_config.json``): a CLIP tower on 336-px
  images with 14-px patches (CLS + 24 x 24 patches = 577 tower tokens, 576 image tokens),
  ``vision_feature_layer = -2``, the ``default`` select strategy, quick-GELU; the llava-hf processor (resize
  the shortest edge to 336, centre crop 336 x 336, bicubic, CLIP mean/std) and chat template; a Llama
  tokenizer (byte-fallback BPE, ``<s>`` prepended) padded to Llama's 32000 pieces so ``<image>`` is id 32000
  and ``<pad>`` 32001, the language model's vocabulary 32064 and 4096 positions as llava-hf's; a two-layer
  GELU projector onto the text width. Only the widths and depths are small (``VISION_*``, ``TEXT_*``).
- ``build_vitb32_miniature(dir)``: an open_clip CLIP with ViT-B-32's geometry (224 px, patch 32, 512-d
  joint embedding, 77-token context, 49408-token BPE) at toy width and depth, written as
  ``open_clip_config.json`` + ``open_clip_model.safetensors`` (``local-dir:DIR`` loads it).

Both load through the real paths (``from_pretrained`` / ``AutoProcessor`` / ``open_clip.create_model``), are
seeded, take seconds, and touch no network. Geometry source: the ``config.json``, ``preprocessor_config.json``
and ``processor_config.json`` of https://huggingface.co/llava-hf/llava-1.5-7b-hf, and open_clip's
``model_configs/ViT-B-32.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllmfl_dist.core.checkpoint import write_text_atomic
from mllmfl_dist.standins.tiny import CLIP_PREPROCESS, IMAGE_TOKEN, LM_HEAD_SCALE, SEED, _tokenizer_corpus, save_llava

# --- llava-1.5-7b-hf's geometry (kept) ---------------------------------------------------------------------
LLAVA_IMAGE_SIZE = 336
LLAVA_PATCH_SIZE = 14  # 24 x 24 grid; 576 image tokens once the CLS is dropped ("default")
LLAMA_PIECES = 32000  # Llama's sentencepiece vocabulary; llava-hf adds <image> = 32000 and <pad> = 32001
LLAVA_TEXT_VOCAB = 32064  # llava-hf's text_config.vocab_size (32002 padded to a multiple of 64)
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
TEXT_MAX_POSITIONS = 4096
# --- shrunk (no shape downstream depends on them) ----------------------------------------------------------
VISION_HIDDEN = 32
VISION_LAYERS = 2  # vision_feature_layer = -2 reads the first layer's output
VISION_HEADS = 2
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
BPE_PIECES = 2000  # pieces learned from the caption vocabulary; the rest of the 32000 are unused fillers

# --- open_clip ViT-B-32's geometry (image 224, patch 32, embed 512, context 77, vocab 49408) at toy size -----
VITB32_IMAGE_SIZE = 224
VITB32_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": VITB32_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_llama_tokenizer():
    """A Llama tokenizer (``LlamaTokenizer``: byte-fallback BPE over ``▁``-marked words, ``<s>`` prepended)
    with llava-hf's ids: ``<unk> <s> </s>`` 0..2, the 256 byte pieces ``<0x00>..<0xFF>`` 3..258 as Llama's,
    pieces learned from the tiny caption corpus, unused fillers up to 32000, then ``<image>`` = 32000 and
    ``<pad>`` = 32001 (padding on the left, for batched generation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_PIECES, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    learner.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    for filler in range(LLAMA_PIECES - len(vocab)):
        vocab[f"<unused{filler}>"] = len(vocab)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in learned["merges"]],
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=TEXT_MAX_POSITIONS,
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, "<pad>"])
    if ids != [IMAGE_TOKEN_ID, PAD_TOKEN_ID]:  # llava-hf's ids, which the configs' prompts meet
        raise RuntimeError(f"miniature tokenizer: <image>, <pad> got ids {ids}, not {IMAGE_TOKEN_ID}, {PAD_TOKEN_ID}")
    return tokenizer


def llava15_config(
    *, image_size: int = LLAVA_IMAGE_SIZE, patch_size: int = LLAVA_PATCH_SIZE, vision_hidden: int = VISION_HIDDEN
):
    """The miniature's ``LlavaConfig``: llava-1.5-7b-hf's, with the widths and depths above. ``image_size``,
    ``patch_size`` and ``vision_hidden`` are there to build a model of *another* geometry (tests of the
    mismatch checks); leave them for the faithful one."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=LLAVA_TEXT_VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        max_position_embeddings=TEXT_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    grid = image_size // patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = PAD_TOKEN_ID
    return config


def build_llava15_miniature(out: str | Path, **geometry) -> Path:
    """Write the LLaVA-1.5 miniature (model, generation config, processor, tokenizer, chat template) to
    ``out`` (created) and return it; ``geometry`` goes to :func:`llava15_config`. Seeded: two builds hold the
    same weights. Loads with ``LlavaForConditionalGeneration.from_pretrained(out)`` / ``AutoProcessor``."""
    from transformers import LlavaForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama_tokenizer()
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(llava15_config(**geometry)).eval()
    with torch.no_grad():  # as the tiny build: a sharper head, so captions depend on the image
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    save_llava(model, tokenizer, out)
    return out


def build_vitb32_miniature(out: str | Path) -> Path:
    """Write the ViT-B-32-shaped open_clip miniature to ``out`` (created) and return it; load it with
    ``open_clip.create_model_and_transforms("local-dir:" + str(out))``."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED + 1)
    model = open_clip.CLIP(**VITB32_CONFIG)
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors")
    )
    preprocess = {**CLIP_PREPROCESS, "size": VITB32_IMAGE_SIZE}
    write_text_atomic(
        out / "open_clip_config.json", json.dumps({"model_cfg": VITB32_CONFIG, "preprocess_cfg": preprocess}, indent=2)
    )
    return out
