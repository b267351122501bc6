"""UniPic2-MetaQuery: Qwen2.5-VL reads the prompt (and images), 256 learnable queries carry it to the DiT.

The recipe follows the official inference scripts:
- the chat template without its default system turn; the user turn is the image(s) then the text, and a
  text-to-image prompt reads "Generate an image: {prompt}"; the generation prompt is added;
- 256 positions are appended whose input embeddings are the conditioner's meta queries (attention mask 1);
- image-token slots take the vision tower's embeddings, each image resized so min_pixels = max_pixels =
  H*W*(28/32)^2, i.e. one vision token per 32-px DiT patch;
- the positive and negative prompts run as one batch, right-padded before the query slots, padding masked;
- position ids are 1-D (cumulative attention mask, on all three M-RoPE axes): the official scripts call the
  language model with inputs_embeds only, and in the pinned transformers (4.55) that gives 1-D positions even
  for image tokens. We pass them explicitly, so newer transformers compute the same thing;
- the last 256 hidden states go through the conditioner.
The negative prompt takes the same path, with the same images.
"""

import logging
from dataclasses import dataclass

import torch

from ..inference.images import to_pil
from ..inference.sampling import PromptEmbeds

log = logging.getLogger("unipic2")

T2I_TEMPLATE = "Generate an image: {prompt}"
DEFAULT_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION_PIXELS_PER_DIT_PATCH = (28 / 32) ** 2  # a 28-px merged vision token per 32-px DiT patch (16 px x 2)
UNDERSTAND_MAX_PIXELS = 1280 * 28 * 28  # Qwen2.5-VL's recommended upper budget for question answering


@dataclass
class MetaQueryMLLM:
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), its processor, and the MetaQuery conditioner."""

    mllm: torch.nn.Module  # Qwen2_5_VLForConditionalGeneration
    processor: object  # Qwen2_5_VLProcessor
    conditioner: torch.nn.Module  # conditioner.MetaQueryConditioner
    # Where inputs go, set by whoever places the modules: with ComfyUI's partial loading some weights stay on the
    # offload device, so the modules' own .device does not say where they compute.
    device: torch.device = torch.device("cpu")


def mllm_pixels(width: int, height: int) -> int:
    """The pixel budget (min = max) the official scripts give the MLLM for an image of this DiT size."""
    return int(height * 28 / 32 * width * 28 / 32)


def query_chat_text(processor, prompt: str, num_images: int) -> str:
    """The chat text of one prompt: image placeholders then text, no system turn, generation prompt added."""
    text = prompt if num_images else T2I_TEMPLATE.format(prompt=prompt)
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    rendered = rendered.removeprefix(DEFAULT_SYSTEM_TURN)
    if "<|im_start|>system" in rendered:
        raise ValueError("UniPic2 MetaQuery: the Qwen2.5-VL chat template adds a system turn we cannot remove; "
                         "use the processor files of Qwen/Qwen2.5-VL-7B-Instruct")
    return rendered


def vision_inputs(processor, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) with each image at its own budget H*W*(28/32)^2."""
    pixel_values, grids = [], []
    for image in images:
        budget = mllm_pixels(image.shape[1], image.shape[0])
        out = processor.image_processor(images=[to_pil(image)], size={"shortest_edge": budget, "longest_edge": budget},
                                        return_tensors="pt")
        pixel_values.append(out.pixel_values)
        grids.append(out.image_grid_thw)
    return torch.cat(pixel_values), torch.cat(grids)


def expand_image_tokens(processor, text: str, grids: torch.Tensor) -> str:
    """Repeat each image placeholder once per merged vision token of its image (as the processor does)."""
    token = processor.image_token
    merge = processor.image_processor.merge_size
    parts = text.split(token)
    if len(parts) != len(grids) + 1:
        raise ValueError(f"chat text has {len(parts) - 1} image placeholders for {len(grids)} images")
    return parts[0] + "".join(token * (int(g.prod()) // merge**2) + part for g, part in zip(grids, parts[1:]))


def query_inputs(encoder: MetaQueryMLLM, prompts: list[str], images: list[torch.Tensor]) -> dict:
    """Model inputs for a batch of prompts sharing the same images, as the official scripts build them.

    Each row is [chat text, right padding, Q query slots (id 0)]; padding is masked out, and the 1-D positions
    count only unmasked tokens, so a row's result equals encoding its prompt alone. pixel_values hold the shared
    images once: the vision tower runs once for all rows.
    """
    processor, num_queries = encoder.processor, encoder.conditioner.config.num_queries
    pixel_values = grids = None
    if images:
        pixel_values, grids = vision_inputs(processor, images)
    rows = []
    for prompt in prompts:
        text = query_chat_text(processor, prompt, len(images))
        if images:
            text = expand_image_tokens(processor, text, grids)
        rows.append(processor.tokenizer(text, return_tensors="pt").input_ids[0])
    longest = max(len(row) for row in rows)
    pad_id = processor.tokenizer.pad_token_id
    ids = torch.stack([torch.cat([row, row.new_full((longest - len(row),), pad_id), row.new_zeros(num_queries)])
                       for row in rows])
    mask = torch.stack([torch.cat([torch.ones(len(row)), torch.zeros(longest - len(row)), torch.ones(num_queries)])
                        for row in rows]).long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1).expand(3, -1, -1)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values,
                image_grid_thw=grids)


@torch.no_grad()
def query_hidden_states(encoder: MetaQueryMLLM, inputs: dict) -> torch.Tensor:
    """The MLLM's last hidden states at the query positions [B, Q, D_llm]."""
    mllm, conditioner, device = encoder.mllm, encoder.conditioner, encoder.device
    ids = inputs["input_ids"].to(device)
    embeds = mllm.get_input_embeddings()(ids)
    num_queries = conditioner.config.num_queries
    embeds[:, -num_queries:] = conditioner.meta_queries.to(device, embeds.dtype)  # broadcast over the batch
    if inputs["pixel_values"] is not None:
        features = mllm.model.get_image_features(inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device))
        shared = torch.cat(features.pooler_output).to(embeds.dtype)
        embeds[ids == mllm.config.image_token_id] = shared.repeat(len(ids), 1)  # row-major: each row's slots in turn
    # explicit position_ids: the model then neither computes M-RoPE positions nor adds cached rope_deltas
    out = mllm.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"].to(device),
                     position_ids=inputs["position_ids"].to(device), use_cache=False)
    return out.last_hidden_state[:, -num_queries:]


@torch.no_grad()
def encode_metaquery(encoder: MetaQueryMLLM, prompts: list[str], images: list[torch.Tensor] = ()) -> PromptEmbeds:
    """prompts (each with the same images, [H, W, 3] 0..1 at the DiT size) -> PromptEmbeds [B, Q, D_joint] /
    [B, D_pooled].

    All prompts (typically the positive and the negative) run as one batch, as in the official scripts.
    """
    conditioner = encoder.conditioner
    hidden = query_hidden_states(encoder, query_inputs(encoder, prompts, list(images)))
    tokens, pooled = conditioner(hidden.to(dtype=conditioner.dtype))
    return PromptEmbeds(tokens.float().cpu(), pooled.float().cpu())


def chat_inputs(encoder: MetaQueryMLLM, images: list[torch.Tensor], question: str) -> dict:
    """Processor inputs on the MLLM's device for one user turn (images, then the question), default template."""
    processor, mllm = encoder.processor, encoder.mllm
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    for image in images:
        if image.shape[0] * image.shape[1] > UNDERSTAND_MAX_PIXELS:
            log.info("UniPic2: image %dx%d is scaled down to about %d pixels for the MLLM",
                     image.shape[1], image.shape[0], UNDERSTAND_MAX_PIXELS)
    pils = [to_pil(image) for image in images]
    vision = dict(images=pils, size={"shortest_edge": 56 * 56, "longest_edge": UNDERSTAND_MAX_PIXELS}) if pils else {}
    inputs = processor(text=[text], return_tensors="pt", **vision)
    mllm.model.rope_deltas = None  # the MLLM computes its own M-RoPE positions here; start from a clean cache
    return {k: v.to(encoder.device) for k, v in inputs.items()}


@torch.no_grad()
def seeded_answer(encoder: MetaQueryMLLM, inputs: dict, seed: int, clean_up_tokenization_spaces: bool | None = None,
                  **generation) -> str:
    """The MLLM's decoded answer to one prompt's processor inputs: generate(**generation) with the global RNGs set to
    `seed` just before (and restored after), so a sampled answer repeats exactly; special tokens are dropped.
    clean_up_tokenization_spaces None keeps the tokenizer's own setting."""
    devices = [encoder.device] if encoder.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = encoder.mllm.generate(**inputs, **generation)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return encoder.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                          clean_up_tokenization_spaces=clean_up_tokenization_spaces)[0].strip()


def answer_question(encoder: MetaQueryMLLM, images: list[torch.Tensor], question: str, max_new_tokens: int = 256,
                    do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> str:
    """Qwen2.5-VL's answer about the images (the official understanding script: default chat template)."""
    # top_k 0: Qwen2.5-VL-7B's generation config sets top_k 1, which would make sampling greedy
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample \
        else dict(do_sample=False)
    return seeded_answer(encoder, chat_inputs(encoder, images, question), seed, max_new_tokens=max_new_tokens,
                         **sampling)


def answer_token_ids(encoder: MetaQueryMLLM, answers: tuple[str, str] = ("Yes", "No")) -> tuple[int, int]:
    """The first token of each answer; they must differ for a yes/no probability to mean anything."""
    ids = tuple(encoder.processor.tokenizer.encode(a, add_special_tokens=False)[0] for a in answers)
    if ids[0] == ids[1]:
        raise ValueError(f"the MLLM's tokenizer starts {answers} with the same token; cannot judge yes/no")
    return ids


@torch.no_grad()
def yes_probability(encoder: MetaQueryMLLM, images: list[torch.Tensor], question: str) -> float:
    """P("Yes") / (P("Yes") + P("No")) for the first answer token, from one forward pass."""
    yes, no = answer_token_ids(encoder)
    logits = encoder.mllm(**chat_inputs(encoder, images, question)).logits[0, -1].float()
    return torch.softmax(logits[[yes, no]], dim=0)[0].item()
