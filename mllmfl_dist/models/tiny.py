"""Tiny random MLLMs for tests and the offline default.

`build_tiny_models(directory)` writes two models that load through exactly the path the real ones take:

- `<directory>/llava/`: a `LlavaForConditionalGeneration` shaped like `llava-hf/llava-1.5-7b-hf` (CLIP vision
  tower, `vision_feature_layer=-2`, `vision_feature_select_strategy="default"`, two-layer GELU projector,
  Llama language model), with a real byte-level BPE tokenizer (built with the `tokenizers` library from a
  small caption vocabulary) and a `LlavaProcessor`. `LlavaForConditionalGeneration.from_pretrained(dir)` and
  `AutoProcessor.from_pretrained(dir)` load it; `mllmfl_dist.models.mllm.load_llava(dir)` is the project's
  loading path.
- `<directory>/clip/`: an open_clip CLIP (small ViT + small text transformer, open_clip's own BPE tokenizer,
  which ships inside the open_clip package) as `open_clip_config.json` + `open_clip_model.safetensors`;
  `open_clip.create_model_and_transforms("local-dir:<directory>/clip")` loads it.

Weights are random but seeded, so a build is deterministic. Nothing touches the network.

A manifest (`tiny_models.json`) is written last and lists every file of the build with its size and
modification time; a directory whose files still match it is complete and is returned as it is (the build is
idempotent and cheap to call at the start of every stage). A half-written build (no manifest), or one whose
files were truncated or replaced since (a power loss, a hand edit), is rebuilt from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mllmfl_dist.core.checkpoint import file_identity, remove_stale_temps, same_file, write_text_atomic

MANIFEST = "tiny_models.json"
# Bump when the tiny architectures or the tokenizer change, so stale builds are rebuilt.
TINY_VERSION = 2  # bump when the built models change, so old directories are rebuilt

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


def build_llava_tokenizer():
    """The tiny LLaVA's tokenizer: byte-level BPE (every string encodes and decodes exactly), `<s>` prepended
    like Llama's, special tokens `<unk> <s> </s> <pad> <image>` with ids 0..4, left padding."""
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
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
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


def _build_llava(out: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_llava_tokenizer()
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    grid = LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE
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
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        max_position_embeddings=TEXT_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    # At the usual init a random LM head gives a nearly flat next-token distribution: captions would
    # hardly depend on the image and pretraining against the LM would have nothing to learn. A sharper
    # head makes the tiny model's outputs a clear function of its visual tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, as llava-1.5's processor
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def _build_clip(out: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(SEED + 1)
    model = open_clip.CLIP(**CLIP_CONFIG)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": CLIP_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}
    write_text_atomic(out / "open_clip_config.json", json.dumps(cfg, indent=2))


def _files(directory: Path, paths: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{relative path: file_identity}`` of every file of the built models, each synced to disk first (the
    libraries' save_pretrained does not), so the manifest never describes files a power loss can still cut."""
    files = {}
    for path in paths.values():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                files[str(f.relative_to(directory))] = file_identity(f)
    return files


def _manifest_ok(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return (manifest.get("version") == TINY_VERSION and isinstance(files, dict) and bool(files)
            and all(same_file(directory / name, identity) for name, identity in files.items()))


def build_tiny_models(directory: str | os.PathLike) -> dict[str, Path]:
    """Write a tiny random LLaVA to `<directory>/llava` and a tiny open_clip CLIP to `<directory>/clip`;
    return `{"llava": path, "clip": path}`.

    Idempotent: a directory whose manifest (written last) says the build is complete and current is returned
    without touching a file. Otherwise each model is written to a temporary sibling directory and renamed into
    place, then the manifest is written, so an interrupted build never looks complete. Processes building the
    same directory at once (ranks of one job) serialise on a lock file; the later ones find the build done.
    """
    directory = Path(directory)
    paths = {"llava": directory / "llava", "clip": directory / "clip"}
    if _manifest_ok(directory):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as lock:
        _lock(lock)
        if not _manifest_ok(directory):
            _build(directory, paths)
    return paths


def _lock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; concurrent builds of one directory are then the caller's problem
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed


def _build(directory: Path, paths: dict[str, Path]) -> None:
    (directory / MANIFEST).unlink(missing_ok=True)
    remove_stale_temps(directory, targets=[MANIFEST])
    for name, build in (("llava", _build_llava), ("clip", _build_clip)):
        # Under the lock no other build runs: partial directories left here belong to killed builds.
        for stale in directory.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = directory / f".{name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            if paths[name].exists():
                shutil.rmtree(paths[name])
            tmp.rename(paths[name])
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    manifest = {
        "version": TINY_VERSION,
        "models": {name: path.name for name, path in paths.items()},
        "llava": {"image_size": LLAVA_IMAGE_SIZE, "patch_size": LLAVA_PATCH_SIZE, "seed": SEED},
        "clip": {"image_size": CLIP_IMAGE_SIZE, "seed": SEED + 1},
        "files": _files(directory, paths),
    }
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))
