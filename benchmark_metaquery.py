"""Benchmark (not a test): MetaQuery encoding (positive + negative) against the official scripts' recipe.

    python benchmark_metaquery.py [--sizes tiny mid] [--image-size 512] [--device cpu|cuda]

The reference is the official scripts' call ported to the installed transformers: the processor on the padded
pair of chat texts with the image given once per row (so the vision tower runs on both copies), then the same
language-model call and conditioner. Ours shares the vision features between the rows. Prints time and peak
memory per encode, text-only and with an image, and the ratios project / reference (target <= 1.0).
"""

import argparse
import tempfile

import torch

from benchmark_sampling import compare, report
from unipic_core.loading import load_metaquery
from unipic_core.images import to_pil
from unipic_core.metaquery import encode_metaquery, mllm_pixels, query_chat_text
from unipic_core.tiny import write_metaquery_folder


@torch.no_grad()
def reference_encode(encoder, prompts, images):
    """The official scripts' recipe: processor(text=pair, images=[image] * 2, padding=True), vision per row."""
    processor, mllm, conditioner = encoder.processor, encoder.mllm, encoder.conditioner
    num_queries = conditioner.config.num_queries
    texts = [query_chat_text(processor, p, len(images)) for p in prompts]
    vision = {}
    if images:
        budget = mllm_pixels(images[0].shape[1], images[0].shape[0])
        vision = dict(images=[to_pil(images[0])] * len(prompts), size={"shortest_edge": budget, "longest_edge": budget})
    inputs = processor(text=texts, padding=True, return_tensors="pt", **vision).to(mllm.device)
    ids = torch.cat([inputs.input_ids, inputs.input_ids.new_zeros(len(prompts), num_queries)], dim=1)
    mask = torch.cat([inputs.attention_mask, inputs.attention_mask.new_ones(len(prompts), num_queries)], dim=1)
    embeds = mllm.get_input_embeddings()(ids)
    embeds[:, -num_queries:] = conditioner.meta_queries[None]
    if images:
        features = mllm.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw)
        embeds[ids == mllm.config.image_token_id] = torch.cat(features.pooler_output)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1).expand(3, -1, -1)
    mllm.model.rope_deltas = None
    hidden = mllm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                        use_cache=False).last_hidden_state[:, -num_queries:]
    return conditioner(hidden)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mid"])
    parser.add_argument("--image-size", type=int, default=512, help="square edit image, px (multiple of 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    prompts = ["make the house blue and add snow on the mountains", "blurry, low quality, distorted"]
    picture = torch.rand(args.image_size, args.image_size, 3, generator=torch.Generator().manual_seed(0))
    print(f"device {device}, torch {torch.__version__}, positive + negative per encode")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            encoder = load_metaquery(write_metaquery_folder(f"{tmp}/{size}", size)).mllm
            encoder.mllm.to(device)
            encoder.conditioner.to(device)
            for label, images in (("text", []), (f"image {args.image_size}px", [picture])):
                ours = encode_metaquery(encoder, prompts, images)
                theirs = reference_encode(encoder, prompts, images)
                assert torch.allclose(ours.tokens, theirs[0].float().cpu(), atol=1e-4), "outputs differ"
                report(f"{size:>5} {label:>15}", "ms", 1, *compare(lambda: encode_metaquery(encoder, prompts, images),
                                                                    lambda: reference_encode(encoder, prompts, images),
                                                                    device, repeats=10))

if __name__ == "__main__":
    main()
