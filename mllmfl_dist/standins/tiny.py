"""Tiny MLLMs for tests and the offline default: random ones, or knowledge-bearing stand-ins trained here.

`build_tiny_models(directory)` (:mod:`mllmfl_dist.standins.build`) writes two models that load through exactly
the path the real ones take:

- `<directory>/llava/`: a `LlavaForConditionalGeneration` shaped like `llava-hf/llava-1.5-7b-hf` (CLIP vision
  tower, `vision_feature_layer=-2`, `vision_feature_select_strategy="default"`, two-layer GELU projector,
  Llama language model), with a real byte-level BPE tokenizer (built with the `tokenizers` library from a
  small caption vocabulary) and a `LlavaProcessor`. `LlavaForConditionalGeneration.from_pretrained(dir)` and
  `AutoProcessor.from_pretrained(dir)` load it; `mllmfl_dist.mllm.llava.load_llava(dir)` is the project's
  loading path.
- `<directory>/clip/`: an open_clip CLIP (small ViT + small text transformer, open_clip's own BPE tokenizer,
  which ships inside the open_clip package) as `open_clip_config.json` + `open_clip_model.safetensors`;
  `open_clip.create_model_and_transforms("local-dir:<directory>/clip")` loads it.

Without `train`, weights are random but seeded (a build is deterministic, takes seconds, and carries no
knowledge: for unit tests). With `train=<corpus>` the same layout holds models trained on a captioned corpus
(`mllmfl_dist.standins.trained`: a contrastive CLIP, and a LLaVA on its frozen tower) plus
`<directory>/model_card.json`. Nothing touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mllmfl_dist.core.checkpoint import write_text_atomic

# --- tiny LLaVA geometry (llava-1.5 layout at toy size) -------------------------------------------------
LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8  # 4 x 4 grid; 16 visual tokens after the CLS is dropped ("default" strategy)
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 2
VISION_INTERMEDIATE = 64
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_INTERMEDIATE = 128
TEXT_MAX_POSITIONS = 512
TOKENIZER_VOCAB = 2048
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]  # ids 0..4
# llava-1.5's conversation format; the processor's chat template produces it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] != 'assistant' %}{{ item['text'] }}{% else %}{% generation %}{{ item['text'] }}"
    "{% endgeneration %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# --- tiny open_clip geometry ----------------------------------------------------------------------------
CLIP_IMAGE_SIZE = 32
CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": CLIP_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # open_clip's default SimpleTokenizer (its BPE file ships with the package) has 49408 tokens.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_PREPROCESS = {
    "size": CLIP_IMAGE_SIZE,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

LM_HEAD_SCALE = 30.0
SEED = 20250101

# Words the tokenizer's BPE merges are learned from: the prompt format, caption vocabulary and the class
# names of the shipped datasets. Any text still encodes (byte-level BPE); these words just get short codes.
_CORPUS_WORDS = """
USER ASSISTANT SYSTEM Describe describe the image picture photo photograph of a an in on at with and or is are
this that there it its shows showing contains containing what which who where how one two three four five
six seven eight nine ten many several some few small large big little tiny huge old new young bright dark
light red orange yellow green blue purple pink brown black white gray grey silver golden colorful striped
spotted wooden metal plastic glass stone water sky grass road street field forest sea beach snow sand mountain
river lake park garden house building city room table floor wall window door background foreground front
back left right top bottom middle center near next to under over above below behind beside between inside
outside standing sitting lying running flying swimming walking jumping eating holding looking parked driving
airplane plane aircraft jet automobile car truck bus train bicycle motorcycle boat ship vehicle wheel wing
bird cat deer dog frog horse animal person man woman child people face hand head eye tail fur feathers
t-shirt shirt top trouser trousers pants pullover sweater dress coat jacket sandal sandals shoe shoes
sneaker sneakers bag handbag ankle boot boots clothing fashion item apple banana flower tree leaf leaves
cup bottle chair sofa bed clock lamp phone computer keyboard book ball toy food plate bowl cake pizza
sign light pole fence bridge tower cloud clouds sun moon night day morning evening close-up view shot
blurry clear simple plain pattern shape object objects scene texture surface edge corner line lines
""".split()
_CORPUS_SENTENCES = [
    "USER: <image>\nDescribe the image. ASSISTANT:",
    "USER: <image>\nWhat is in this picture? ASSISTANT:",
    "A photo of a small red car parked on the street.",
    "A black and white image of a dog sitting on the grass.",
    "An airplane flying in the blue sky with white clouds.",
    "A close-up photo of a frog on a green leaf.",
]


def _tokenizer_corpus() -> list[str]:
    words = _CORPUS_WORDS + [w.capitalize() for w in _CORPUS_WORDS if not w[0].isupper()]
    # Each word as it starts a text and as it follows a space (byte-level BPE keeps the space in the token).
    return list(_CORPUS_SENTENCES) + words + [" " + w for w in words] + [str(i) for i in range(100)]


def build_llava_tokenizer(extra_texts: Sequence[str] = ()):
    """The tiny LLaVA's tokenizer: byte-level BPE (every string encodes and decodes exactly), `<s>` prepended
    like Llama's, special tokens `<unk> <s> </s> <pad> <image>` with ids 0..4, left padding. `extra_texts`
    (e.g. a caption corpus) join the texts the BPE merges are learned from; without them the tokenizer is the
    random build's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus() + list(extra_texts), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=TEXT_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    return hf


def llava_config(
    tokenizer,
    vision,
    *,
    text_hidden: int = TEXT_HIDDEN,
    text_layers: int = TEXT_LAYERS,
    text_heads: int = TEXT_HEADS,
    text_intermediate: int = TEXT_INTERMEDIATE,
    vision_feature_layer: int = -2,
):
    """A llava-1.5-shaped `LlavaConfig`: the CLIP `vision` config (a `CLIPVisionConfig`), a Llama language
    model of the given sizes over `tokenizer`'s vocabulary, a two-layer GELU projector, the `default` feature
    selection (CLS dropped) at `vision_feature_layer`, one `<image>` expanding to the tower's patch grid."""
    from transformers import LlamaConfig, LlavaConfig

    grid = vision.image_size // vision.patch_size
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=TEXT_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def llava_processor(config, tokenizer):
    """llava-1.5's `LlavaProcessor` for a model `config` (`LlavaConfig`): a CLIP image processor at the
    tower's size (resize the shortest edge, centre crop), `tokenizer`, the `<image>` expansion to the tower's
    patch grid and llava-1.5's chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = config.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token, as llava-1.5's processor
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def save_llava(model, tokenizer, out: Path) -> None:
    """`save_pretrained` the model (greedy generation config) and its `llava_processor` into `out`, as a hub
    LLaVA directory is laid out."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    llava_processor(model.config, tokenizer).save_pretrained(out)


def build_random_llava(out: Path) -> None:
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

    tokenizer = build_llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=LLAVA_PATCH_SIZE,
        projection_dim=VISION_HIDDEN,
        hidden_act="quick_gelu",  # as openai/clip-vit-large-patch14-336
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(llava_config(tokenizer, vision)).eval()
    # At the usual init a random LM head gives a nearly flat next-token distribution: captions would
    # hardly depend on the image and pretraining against the LM would have nothing to learn. A sharper
    # head makes the tiny model's outputs a clear function of its visual tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    save_llava(model, tokenizer, out)


def build_random_clip(out: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(SEED + 1)
    model = open_clip.CLIP(**CLIP_CONFIG)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": CLIP_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}
    write_text_atomic(out / "open_clip_config.json", json.dumps(cfg, indent=2))
