"""Training of the LLaVA stand-in: LLaVA's recipe (Liu et al., NeurIPS 2023; llava-1.5) at toy scale.

`train_llava(clip, clip_cfg, images, captions, settings)` -> `(LlavaForConditionalGeneration, tokenizer, stats)`:

1. **Vision tower**: the contrastively trained CLIP stand-in's image tower, converted to a `CLIPVisionModel`
   (`mllmfl_dist.standins.clip_to_hf`) and frozen, as llava-1.5 uses OpenAI's CLIP ViT frozen.
2. **Language model** (a small Llama, `LlamaForCausalLM` inside the LLaVA): first trained alone on the caption
   text (next-token loss), standing in for the pretrained LLM (Vicuna) LLaVA starts from.
3. **Stage 1, feature alignment**: the projector alone (LM frozen) on "describe" -> caption pairs.
4. **Stage 2, instruction tuning**: projector + LM on the mix of describe -> caption and question ->
   category name pairs that `standin_data.instruction_pairs` derives from the captions.

Sequences are `prompt + " " + answer + </s>` with the processor's `<image>` expansion; the loss is the model's
own next-token cross-entropy on the answer and `</s>` only (the prompt is masked, as in LLaVA). The frozen
tower's features are computed once (for each image and its horizontal mirror, a random one of the two per
step) and put into the `<image>` positions as LLaVA's forward does (`mllm.llava.visual_inputs_embeds`);
`answer_loss` is the model's own loss computed at the answer positions only (tested equal). Deterministic
for a seed and thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from mllmfl_dist.mllm.llava import IGNORE_INDEX, clip_visual_features, llava_inner, visual_inputs_embeds
from mllmfl_dist.standins.standin_settings import StandinSettings
from mllmfl_dist.standins.web_captions import CATEGORY_NAMES
from mllmfl_dist.standins.standin_data import DESCRIBE_REQUESTS, QUESTION_REQUESTS, instruction_pairs, llava_prompt
from mllmfl_dist.standins.clip_train import cosine_with_warmup
from mllmfl_dist.data.images import to_pil
from mllmfl_dist.standins.clip_to_hf import convert_visual
from mllmfl_dist.standins.tiny import build_llava_tokenizer, llava_config, llava_processor

__all__ = ["train_llava", "answer_loss", "collate_answers", "encode_answer", "tokenizer_texts"]


def tokenizer_texts(captions: Sequence[str]) -> list[str]:
    """The texts the stand-in's BPE merges are learned from, besides the random build's word list: the
    captions, the instruction requests and the category names (so they get short codes)."""
    names = list(CATEGORY_NAMES)
    return list(captions) + list(DESCRIBE_REQUESTS + QUESTION_REQUESTS) + names + [" " + n for n in names]


def encode_answer(processor, prompt_ids: list[int], answer: str) -> tuple[list[int], int]:
    """`(ids, start)`: `prompt_ids` (the processor's ids of the prompt, `<image>` expanded) followed by the
    tokens of `" " + answer` and `</s>`; `start` = len(prompt_ids), the first position with a loss. Byte-level
    BPE splits before the space, so these are the ids the processor gives `prompt + " " + answer` (tested)."""
    tok = processor.tokenizer
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + list(answer_ids) + [tok.eos_token_id], len(prompt_ids)


def collate_answers(rows: Sequence[tuple[list[int], int]], pad_id: int):
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 before `start` and on padding)."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        labels[r, start : len(ids)] = input_ids[r, start : len(ids)]
    return input_ids, attention, labels


def answer_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    visual_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLaVA's next-token cross-entropy (mean over the positions whose shifted label is not -100), with the
    LM head applied at those positions only: the same value as `model(..., labels=labels).loss` (tested),
    without the logits of the prompt and image positions, which are most of a sequence and most of the cost
    of a small model. `visual_features` (`[B, tokens, width]`, tower space) fill the `<image>` positions;
    None: a text-only sequence."""
    if visual_features is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    else:
        inputs_embeds = visual_inputs_embeds(model, visual_features, input_ids)
    hidden = (
        llava_inner(model)
        .language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        .last_hidden_state
    )
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _run_stage(
    name: str,
    model,
    params,
    rows,
    features,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    pad_id: int,
    progress: bool,
) -> dict:
    """AdamW with warm-up + cosine over `epochs` passes of `rows` (`(ids, start, image)`; image -1: text
    only). Returns `{"steps", "final_loss"}` (the last step's loss)."""
    if epochs <= 0:
        return {"steps": 0, "final_loss": None}
    per_epoch = max(1, len(rows) // batch_size)
    steps = epochs * per_epoch
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps, max(1, steps // 10)))
    model.train()
    loss = torch.tensor(float("nan"))
    with tqdm(total=steps, desc=f"LLaVA {name}", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=generator).tolist()
            for b in range(per_epoch):
                batch = [rows[i] for i in order[b * batch_size : (b + 1) * batch_size]]
                input_ids, attention, labels = collate_answers([(ids, start) for ids, start, _ in batch], pad_id)
                visual = None
                if features is not None:
                    images = torch.tensor([image for _, _, image in batch])
                    mirror = torch.randint(0, 2, (len(batch),), generator=generator)
                    visual = features[mirror, images]
                loss = answer_loss(model, input_ids, attention, labels, visual)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return {"steps": steps, "final_loss": loss.item()}


@torch.no_grad()
def _tower_features(model, processor, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """`[2, N, tokens, width]`: the frozen tower's features (as the projector reads them) of every image and
    of its horizontal mirror, from the processor's own pixel values."""
    parts = []
    for start in range(0, len(images), batch):
        pil = [to_pil(im).convert("RGB") for im in images[start : start + batch]]
        pixels = processor.image_processor(pil, return_tensors="pt")["pixel_values"]
        parts.append(torch.stack([clip_visual_features(model, pixels), clip_visual_features(model, pixels.flip(-1))]))
    return torch.cat(parts, dim=1)


def train_llava(
    clip,
    clip_cfg: dict,
    images: torch.Tensor,
    captions: Sequence[str],
    settings: StandinSettings,
    *,
    progress: bool = True,
):
    """The trained LLaVA stand-in (eval mode, float32) and its tokenizer; see the module docstring.

    clip: the trained `open_clip.CLIP` whose `visual` becomes the tower; clip_cfg: its open_clip model config.
    images: uint8 `[N, C, H, W]`; captions: N strings. Returns `(model, tokenizer, stats)`, stats holding
    the pair counts and each stage's steps and last loss."""
    from transformers import LlavaForConditionalGeneration

    vcfg = clip_cfg["vision_cfg"]
    tower = convert_visual(clip.visual, image_size=vcfg["image_size"], patch_size=vcfg["patch_size"])
    tokenizer = build_llava_tokenizer(tokenizer_texts(captions))
    config = llava_config(
        tokenizer,
        tower.config,
        text_hidden=settings.text_hidden,
        text_layers=settings.text_layers,
        text_heads=settings.text_heads,
        text_intermediate=settings.text_intermediate,
        vision_feature_layer=settings.vision_feature_layer,
    )
    torch.manual_seed(settings.seed)
    model = LlavaForConditionalGeneration(config)
    inner = llava_inner(model)
    inner.vision_tower.load_state_dict(tower.state_dict())
    inner.vision_tower.requires_grad_(False)
    model.eval()
    processor = llava_processor(config, tokenizer)
    features = _tower_features(model, processor, images)

    pairs = instruction_pairs(captions, settings.seed)
    # The <image> expansion depends on the config alone, so any image serves to tokenise a prompt.
    reference = to_pil(images[0]).convert("RGB")
    prompt_ids: dict[str, list[int]] = {}
    rows = []
    for image, prompt, answer in pairs:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = processor(images=[reference], text=[prompt], return_tensors="pt")["input_ids"][
                0
            ].tolist()
        ids, start = encode_answer(processor, prompt_ids[prompt], answer)
        rows.append((ids, start, image))
    describe = {llava_prompt(r) for r in DESCRIBE_REQUESTS}
    caption_rows = [(tokenizer(c)["input_ids"] + [tokenizer.eos_token_id], 1, -1) for c in captions]

    generator = torch.Generator().manual_seed(settings.seed)
    common = {
        "batch_size": settings.llava_batch_size,
        "generator": generator,
        "pad_id": tokenizer.pad_token_id,
        "progress": progress,
    }
    lm = list(inner.language_model.parameters()) + list(model.lm_head.parameters())
    projector = list(inner.multi_modal_projector.parameters())
    stats = {"pairs": len(rows), "question_pairs": sum(1 for _, p, _ in pairs if p not in describe)}
    stats["lm"] = _run_stage(
        "LM on captions", model, lm, caption_rows, None, epochs=settings.lm_epochs, lr=settings.lm_lr, **common
    )
    describe_rows = [r for r, (_, p, _) in zip(rows, pairs) if p in describe]
    for p in lm:
        p.requires_grad_(False)
    stats["projector"] = _run_stage(
        "stage 1 (projector)",
        model,
        projector,
        describe_rows,
        features,
        epochs=settings.projector_epochs,
        lr=settings.projector_lr,
        **common,
    )
    for p in lm:
        p.requires_grad_(True)
    stats["finetune"] = _run_stage(
        "stage 2 (projector + LM)",
        model,
        projector + lm,
        rows,
        features,
        epochs=settings.finetune_epochs,
        lr=settings.finetune_lr,
        **common,
    )
    return model.eval(), tokenizer, stats
