"""An open_clip ViT image tower in the Hugging Face `CLIPVisionModel` layout.

The LLaVA stand-in's vision tower is the image tower of the CLIP stand-in, trained once contrastively with
open_clip and converted here, so the two share one training (as llava-1.5's tower is OpenAI's CLIP ViT-L/14).
The two implementations compute the same function:

| open_clip `VisionTransformer`                 | transformers `CLIPVisionModel`      |
|-----------------------------------------------|-------------------------------------------------------|
| `conv1` (no bias)                             | `embeddings.patch_embedding`                          |
| `class_embedding`, `positional_embedding`     | `embeddings.class_embedding`, `embeddings.position_embedding` |
| `ln_pre`                                      | `pre_layrnorm`                                        |
| block i: `ln_1`, `ln_2`                       | layer i: `layer_norm1`, `layer_norm2`                 |
| block i: `attn.in_proj_*` (q; k; v stacked)   | layer i: `self_attn.{q,k,v}_proj`                     |
| block i: `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj` | layer i: `self_attn.out_proj`, `mlp.fc1`, `mlp.fc2` |
| `ln_post` (on the CLS token)                  | `post_layernorm` (on the CLS token: `pooler_output`)  |

open_clip's `proj` (the joint-embedding projection) has no place in a `CLIPVisionModel`; LLaVA reads hidden
states and never uses it. `convert_visual(visual)` -> a `CLIPVisionModel` in eval mode whose
`hidden_states[k]` equal open_clip's residual stream after `ln_pre` and k blocks, and whose `pooler_output`
equals `ln_post` of the CLS token (tested to float rounding).
"""

from __future__ import annotations

import torch

__all__ = ["vision_config_of", "convert_visual"]


def vision_config_of(visual, *, image_size: int, patch_size: int):
    """The `CLIPVisionConfig` of an open_clip `VisionTransformer` (standard ViT blocks, no layer scale, no
    attention pooling, CLS pooling). `image_size` / `patch_size` are the open_clip `vision_cfg` values.
    Raises ValueError for a tower this conversion does not cover."""
    from transformers import CLIPVisionConfig

    blocks = visual.transformer.resblocks
    first = blocks[0]
    if not isinstance(first.ls_1, torch.nn.Identity) or getattr(visual, "attn_pool", None) is not None:
        raise ValueError("only plain open_clip ViTs (no layer scale, no attention pooling) convert")
    if visual.conv1.bias is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("only open_clip ViTs with a bias-free patch embedding and CLS pooling convert")
    from open_clip.transformer import QuickGELU

    gelu = first.mlp.gelu
    if not isinstance(gelu, (QuickGELU, torch.nn.GELU)) or getattr(gelu, "approximate", "none") != "none":
        raise ValueError(f"open_clip MLP activation {gelu} has no CLIPVisionConfig.hidden_act equivalent here")
    act = "quick_gelu" if isinstance(gelu, QuickGELU) else "gelu"
    width = visual.conv1.out_channels
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=visual.proj.shape[1] if visual.proj is not None else width,
        hidden_act=act,
        layer_norm_eps=first.ln_1.eps,
    )


def _state_dict(visual) -> dict[str, torch.Tensor]:
    src = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    out = {
        "embeddings.class_embedding": src["class_embedding"],
        "embeddings.patch_embedding.weight": src["conv1.weight"],
        "embeddings.position_embedding.weight": src["positional_embedding"],
        "pre_layrnorm.weight": src["ln_pre.weight"],
        "pre_layrnorm.bias": src["ln_pre.bias"],
        "post_layernorm.weight": src["ln_post.weight"],
        "post_layernorm.bias": src["ln_post.bias"],
    }
    for i in range(len(visual.transformer.resblocks)):
        a, b = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = src[a + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[a + "attn.in_proj_bias"].chunk(3)
        out.update({
            b + "self_attn.q_proj.weight": q, b + "self_attn.q_proj.bias": qb,
            b + "self_attn.k_proj.weight": k, b + "self_attn.k_proj.bias": kb,
            b + "self_attn.v_proj.weight": v, b + "self_attn.v_proj.bias": vb,
            b + "self_attn.out_proj.weight": src[a + "attn.out_proj.weight"],
            b + "self_attn.out_proj.bias": src[a + "attn.out_proj.bias"],
            b + "layer_norm1.weight": src[a + "ln_1.weight"], b + "layer_norm1.bias": src[a + "ln_1.bias"],
            b + "layer_norm2.weight": src[a + "ln_2.weight"], b + "layer_norm2.bias": src[a + "ln_2.bias"],
            b + "mlp.fc1.weight": src[a + "mlp.c_fc.weight"], b + "mlp.fc1.bias": src[a + "mlp.c_fc.bias"],
            b + "mlp.fc2.weight": src[a + "mlp.c_proj.weight"], b + "mlp.fc2.bias": src[a + "mlp.c_proj.bias"],
        })  # fmt: skip
    return out


def convert_visual(visual, *, image_size: int, patch_size: int):
    """A `CLIPVisionModel` (eval mode, float32) computing what the open_clip `visual` computes; see the module
    docstring. Raises ValueError for an unsupported tower or when a weight is left unmapped."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(vision_config_of(visual, image_size=image_size, patch_size=patch_size))
    state = _state_dict(visual)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # position_ids is a buffer HF builds itself; anything else missing would be an untrained weight.
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPVisionModel: missing {missing}, unexpected {unexpected}")
    return model.eval()
