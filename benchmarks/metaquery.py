"""Benchmark (not a test): MetaQuery encoding (positive + negative, with an edit image), time and peak memory.

    python -m benchmarks.metaquery [--sizes tiny mid] [--image-size 512] [--device cpu|cuda] [--budget 0.3]

from the repository root, where `unipic_core`, `tools` and the `benchmarks` package import.

Legs, same process, same weights and inputs:
- reference: the official scripts' recipe ported to the installed transformers (the processor on the padded pair of
  chat texts with the image given once per row, so the vision tower runs on both copies; the plain modules);
- project: the pack's encode_metaquery on the plain modules (vision features shared between the rows);
- full / partial / fp8 / fp8 partial: the pack's encode with the MLLM and conditioner under ComfyUI's memory
  manager (the tests' ComfyUI imported here), loaded fully, or with only --budget of their weights resident (the
  rest cast onto the device per layer as it runs), with the MLLM's Linear weights stored in scaled fp8.
Prints ms and MiB per encode for each leg, its ratios to the reference, and each leg's largest difference from the
reference's conditioning tokens. Peak memory is CUDA's max_memory_allocated on a GPU, the process RSS growth on the
CPU (benchmarks.harness.PeakMemory); on a CPU the weights never move, so partial loading saves no memory there.
"""

import tempfile

import torch

from benchmarks.harness import NativeHost, benchmark_parser, compare, ratios
from unipic_core.inference.images import to_pil
from unipic_core.models.fp8_weights import quantize_linears
from unipic_core.models.loading import load_metaquery_encoder
from unipic_core.models.metaquery import encode_metaquery, mllm_pixels, query_chat_text
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
    inputs = processor(text=texts, padding=True, return_tensors="pt", **vision).to(encoder.device)
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
    return conditioner(hidden)[0]


class Managed:
    """An encoder's MLLM and conditioner under ComfyUI's memory manager, loaded with a budget for each leg."""

    def __init__(self, host, encoder, device):
        wrap = host.pack.nodes.host.memory.wrap
        encoder.device = device
        self.encoder, self.device = encoder, device
        self.patchers = [wrap(encoder.mllm), wrap(encoder.conditioner)]

    def encode(self, prompts, images, budget):
        for patcher in self.patchers:
            size = 0 if budget is None else int(patcher.model_size() * budget)
            patcher.patch_model(device_to=self.device, lowvram_model_memory=size)
        try:
            return encode_metaquery(self.encoder, prompts, images).tokens
        finally:
            for patcher in self.patchers:
                patcher.unpatch_model(patcher.offload_device)


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=512, help="square edit image, px (multiple of 32)")
    parser.add_argument("--budget", type=float, default=0.3, help="resident fraction for the partial legs")
    args = parser.parse_args()
    device = torch.device(args.device)
    prompts = ["make the house blue and add snow on the mountains", "blurry, low quality, distorted"]
    images = [torch.rand(args.image_size, args.image_size, 3, generator=torch.Generator().manual_seed(0))]
    print(f"device {device}, torch {torch.__version__}, positive + negative with a {args.image_size}px image")
    with tempfile.TemporaryDirectory() as tmp:
        host = NativeHost(f"{tmp}/host", device, pytorch_attention=False)
        for size in args.sizes:
            folder = write_metaquery_folder(f"{tmp}/{size}", size)
            plain = load_metaquery_encoder(folder)
            plain.mllm.to(device)
            plain.conditioner.to(device)
            plain.device = device
            managed = Managed(host, load_metaquery_encoder(folder), device)
            fp8 = load_metaquery_encoder(folder)
            quantize_linears(fp8.mllm, torch.float8_e4m3fn, keep=(fp8.mllm.lm_head,))
            managed_fp8 = Managed(host, fp8, device)
            legs = {
                "reference": lambda: reference_encode(plain, prompts, images),
                "project": lambda: encode_metaquery(plain, prompts, images).tokens,
                "full": lambda: managed.encode(prompts, images, None),
                "partial": lambda: managed.encode(prompts, images, args.budget),
                "fp8": lambda: managed_fp8.encode(prompts, images, None),
                "fp8 partial": lambda: managed_fp8.encode(prompts, images, args.budget),
            }
            with torch.no_grad():
                expected = legs["reference"]().float().cpu()
                gaps = {name: (fn().float().cpu() - expected).abs().max().item() for name, fn in legs.items()}
                figures = compare(legs, device, repeats=5)
            for name, (t, m) in figures.items():
                print(f"{size:>5} {name:>12}: {t * 1000:8.1f} ms {m:8.1f} MiB | /reference "
                      f"{ratios((t, m), figures['reference'])} | max |tokens - reference| {gaps[name]:.1e}")


if __name__ == "__main__":
    main()
