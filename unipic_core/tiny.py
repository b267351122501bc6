"""Write small random-weight checkpoints in the official UniPic2 folder layout.

    python -m unipic_core.tiny OUT_DIR [--size tiny|mid] [--kind kontext|metaquery] [--native-vae]
    python -m unipic_core.tiny OUT.safetensors --kind qwen25vl-file --tokenizer QWEN25_TOKENIZER_DIR
    python -m unipic_core.tiny OUT_DIR --kind clip-reward          (PickScore / CLIP ViT-L/14 layout)
    python -m unipic_core.tiny OUT.pth --kind aesthetic-mlp        (the improved aesthetic predictor's file)
    python -m unipic_core.tiny OUT_DIR --kind editscore-adapter    (EditScore's peft LoRA, for the MetaQuery's MLLM)
    python -m unipic_core.tiny OUT_DIR --kind owlv2                (the object reward's detector, OWLv2's layout)

write_full_size_metaquery_folder writes UniPic2-MetaQuery at its published sizes with random bf16 weights (~22 GB),
for benchmarks on a GPU.

The folder goes through exactly the loading code a real checkpoint uses (config.json + safetensors per
component, tokenizers saved by their own classes), so tests, the demo and CI exercise the real paths offline.
"tiny" runs a 512 px edit in seconds on a CPU; "mid" is for CPU benchmarks. The qwen25vl-file kind writes a tiny
Qwen2.5-VL as the single file ComfyUI keeps in models/text_encoders (with the real Qwen2.5 tokenizer's vocabulary,
e.g. ComfyUI's comfy/text_encoders/qwen25_tokenizer, which the file's loader reads). The reward kinds are
tiny_rewards.py's, whatever --size says; the CLIP reward's and the aesthetic MLP's widths match (16-wide
embeddings). The EditScore adapter fits the Qwen2.5-VL inside a metaquery folder of the same --size.

Test fixtures kept in the engine rather than in tests/, because the commands above, the demo (tools/demo.py) and the
benchmarks (benchmarks/) write these checkpoints too.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
from transformers import T5TokenizerFast

from .models.conditioner import MetaQueryConditioner
from .models.kontext_transformer import KontextSD3Transformer
from .models.repos import CONDITIONER_CLASS, KONTEXT_TRANSFORMER_CLASS
from .random_weights import write_random_weights
from .tiny_qwen import QWEN25VL_7B, write_qwen25vl_file, write_qwen25vl_folder

# SD3.5-Medium's values where a tiny model can keep them; widths and depths shrunk. The DiT keeps head dim 64 and
# layers == heads (hidden = 64 x depth), as ComfyUI's MMDiT hard-wires, so Load Diffusion Model loads it natively.
SIZES = {
    "tiny": dict(layers=2, heads=2, head_dim=64, clip_l=8, clip_g=12, t5=32, t5_layers=1, vae=(32, 32, 32, 32),
                 llm=128, connector=16, connector_layers=2),
    "mid": dict(layers=4, heads=4, head_dim=64, clip_l=64, clip_g=96, t5=256, t5_layers=2, vae=(32, 64, 64, 64),
                llm=256, connector=128, connector_layers=4),
}
# transformer/config.json of UniPic2-SD3.5M-Kontext-2B (SD3.5-Medium's MMDiT), for full-size random-weight runs.
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# vae/config.json's architecture (SD3's VAE): the widths ComfyUI's VAELoader hard-codes. The tiny sizes' narrow
# VAEs load through the pack's loader only; this one (84 M weights, --native-vae) in VAELoader too.
SD3_VAE_CHANNELS, SD3_VAE_LAYERS = (128, 256, 512, 512), 2
# UniPic2-MetaQuery's conditioner at full size: the connector at the official ConnectorConfig's defaults
# (conditioner.py's CONNECTOR_DEFAULTS; the published conditioner/config.json's own values are not recorded here),
# between Qwen2.5-VL-7B's width and the DiT's conditioning widths.
FULL_CONDITIONER = dict(connector_config={}, num_queries=256, llm_hidden_size=QWEN25VL_7B["hidden"],
                        pooled_projection_dim=2048, joint_attention_dim=4096)


def _byte_level_vocab() -> dict[str, int]:
    """Every byte as a word piece and as a word end: char-level BPE, no merges needed."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(sorted(chars))})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_clip_tokenizer(folder: Path, max_length: int = 77, **special_tokens: str) -> dict[str, int]:
    """A byte-level CLIPTokenizer saved in `folder` (its context and special tokens as given, else CLIP's); returns
    its vocabulary."""
    vocab = _byte_level_vocab()
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, **special_tokens).save_pretrained(str(folder))
    # The official CLIP tokenizer folders ship vocab.json + merges.txt (no tokenizer.json): load that path.
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def write_clip(folder: Path, tokenizer_folder: Path, width: int) -> None:
    vocab = write_clip_tokenizer(tokenizer_folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModelWithProjection(config).save_pretrained(str(folder))


def write_t5(folder: Path, tokenizer_folder: Path, width: int, layers: int) -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in sorted(ByteLevel.alphabet())]
    pieces += [("\u2581" + c, -1.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(tokenizer_folder))
    config = T5Config(
        vocab_size=len(pieces), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )
    T5EncoderModel(config).save_pretrained(str(folder))


def write_transformer(folder: Path, size: dict) -> None:
    assert size["layers"] == size["heads"] and size["head_dim"] == 64, "ComfyUI's MMDiT needs hidden = 64 x depth"
    model = KontextSD3Transformer(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=size["layers"],
        attention_head_dim=size["head_dim"], num_attention_heads=size["heads"], joint_attention_dim=size["t5"],
        caption_projection_dim=size["heads"] * size["head_dim"], pooled_projection_dim=size["clip_l"] + size["clip_g"],
        pos_embed_max_size=96, qk_norm="rms_norm", dual_attention_layers=tuple(range(size["layers"] // 2 + 1)),
    )
    save_with_official_class(model, folder, KONTEXT_TRANSFORMER_CLASS)


def save_with_official_class(model, folder: Path, class_name: str) -> None:
    """save_pretrained (a model on the meta device: its config and random bf16 weights), then name the class as
    the official config.json does (our class names differ)."""
    if model.device.type == "meta":
        model.save_config(str(folder))
        write_random_weights(model, folder, "diffusion_pytorch_model")
    else:
        model.save_pretrained(str(folder))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = class_name
    config_path.write_text(json.dumps(config, indent=2))


def write_conditioner(folder: Path, size: dict) -> None:
    width = size["connector"]
    conditioner = MetaQueryConditioner(
        connector_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=size["connector_layers"],
                              num_attention_heads=2, _attn_implementation="flash_attention_2"),
        num_queries=256, llm_hidden_size=size["llm"], pooled_projection_dim=size["clip_l"] + size["clip_g"],
        joint_attention_dim=size["t5"],
    )
    torch.nn.init.normal_(conditioner.meta_queries, std=0.02)  # zeros would make every query identical
    save_with_official_class(conditioner, folder, CONDITIONER_CLASS)


def random_vae(channels: tuple[int, ...], layers_per_block: int = 1) -> AutoencoderKL:
    """An SD3-latent-space AutoencoderKL (16 channels, SD3's scaling and shift) with random weights."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )


def write_vae(folder: Path, channels: tuple[int, ...], layers_per_block: int = 1) -> None:
    random_vae(channels, layers_per_block).save_pretrained(str(folder))


def write_dit_and_vae(out: Path, spec: dict, native_vae: bool = False) -> None:
    """What Kontext and MetaQuery folders share: transformer/, vae/, scheduler/. native_vae: SD3's VAE widths,
    which ComfyUI's VAELoader hard-codes (84 M weights, ~20x slower to run than the tiny sizes' VAEs)."""
    write_transformer(out / "transformer", spec)
    if native_vae:
        write_vae(out / "vae", SD3_VAE_CHANNELS, SD3_VAE_LAYERS)
    else:
        write_vae(out / "vae", spec["vae"])
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(str(out / "scheduler"))


def write_kontext_folder(out: str | Path, size: str = "tiny", seed: int = 0, native_vae: bool = False) -> Path:
    """Write a complete random-weight Kontext folder (official layout) to `out` and return its path; with
    native_vae every weight file also loads in ComfyUI's own loaders (Load Diffusion Model, VAELoader)."""
    out = Path(out)
    spec = SIZES[size]
    torch.manual_seed(seed)
    write_dit_and_vae(out, spec, native_vae)
    write_clip(out / "text_encoder", out / "tokenizer", spec["clip_l"])
    write_clip(out / "text_encoder_2", out / "tokenizer_2", spec["clip_g"])
    write_t5(out / "text_encoder_3", out / "tokenizer_3", spec["t5"], spec["t5_layers"])
    (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3KontextPipeline"}, indent=2))
    return out


def write_metaquery_folder(out: str | Path, size: str = "tiny", seed: int = 0, qwen_inside: bool = True) -> Path:
    """Write a random-weight MetaQuery folder (transformer/, vae/, scheduler/, conditioner/) to `out`; with
    qwen_inside, a matching tiny Qwen2.5-VL folder goes in `out`/Qwen2.5-VL-tiny, else write one separately with
    tiny_qwen.write_qwen25vl_folder(path, SIZES[size]["llm"])."""
    out = Path(out)
    spec = SIZES[size]
    torch.manual_seed(seed)
    write_dit_and_vae(out, spec)
    write_conditioner(out / "conditioner", spec)
    (out / "model_index.json").write_text(json.dumps({"_class_name": "UniPic2MetaQueryPipeline"}, indent=2))
    if qwen_inside:
        write_qwen25vl_folder(out / "Qwen2.5-VL-tiny", hidden_size=spec["llm"], seed=seed)
    return out


def write_full_size_metaquery_folder(out: str | Path, seed: int = 0) -> Path:
    """UniPic2-MetaQuery at its published sizes with random bf16 weights (~22 GB): the SD3.5-M DiT, SD3's VAE, the
    full-size conditioner and Qwen2.5-VL-7B-Instruct inside (the byte-level tokenizer), for benchmarks. The large
    parts are built on the meta device and written shard by shard, so writing needs about one shard's memory."""
    out = Path(out)
    torch.manual_seed(seed)
    with torch.device("meta"):
        transformer = KontextSD3Transformer(**SD35M_TRANSFORMER)
        conditioner = MetaQueryConditioner(**FULL_CONDITIONER)
    save_with_official_class(transformer, out / "transformer", KONTEXT_TRANSFORMER_CLASS)
    save_with_official_class(conditioner, out / "conditioner", CONDITIONER_CLASS)
    write_vae(out / "vae", SD3_VAE_CHANNELS, SD3_VAE_LAYERS)
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(str(out / "scheduler"))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "UniPic2MetaQueryPipeline"}, indent=2))
    write_qwen25vl_folder(out / "Qwen2.5-VL-7B-Instruct", seed=seed, full_size=True)
    return out


def write_tiny_editscore_adapter(out: str | Path, size: str = "tiny") -> Path:
    """An EditScore adapter for the Qwen2.5-VL inside write_metaquery_folder(..., size)."""
    from .tiny_rewards import write_editscore_adapter  # it builds on this module

    with tempfile.TemporaryDirectory() as tmp:
        return write_editscore_adapter(out, write_qwen25vl_folder(Path(tmp) / "qwen", SIZES[size]["llm"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (created), or the file for qwen25vl-file / aesthetic-mlp")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--kind", choices=["kontext", "metaquery", "qwen25vl-file", "clip-reward", "aesthetic-mlp",
                                           "editscore-adapter", "owlv2"],
                        default="kontext")
    parser.add_argument("--tokenizer", help="qwen25vl-file: a Qwen2.5 tokenizer folder")
    parser.add_argument("--native-vae", action="store_true", help="kontext: SD3's VAE widths, so ComfyUI's "
                        "VAELoader loads vae/ too (slower)")
    args = parser.parse_args()
    if args.kind == "qwen25vl-file":
        if not args.tokenizer:
            parser.error("--kind qwen25vl-file needs --tokenizer (e.g. ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_qwen25vl_folder(Path(tmp) / "qwen", SIZES[args.size]["llm"], tokenizer_folder=args.tokenizer)
            print(write_qwen25vl_file(args.out, folder))
        return
    if args.kind == "editscore-adapter":
        print(write_tiny_editscore_adapter(args.out, args.size))
        return
    if args.kind in ("clip-reward", "aesthetic-mlp", "owlv2"):
        from .tiny_rewards import write_aesthetic_mlp, write_clip_reward_folder, write_owlv2_folder  # built on this

        write = {"clip-reward": write_clip_reward_folder, "aesthetic-mlp": write_aesthetic_mlp,
                 "owlv2": write_owlv2_folder}[args.kind]
        print(write(args.out))
    elif args.kind == "kontext":
        print(write_kontext_folder(args.out, args.size, native_vae=args.native_vae))
    else:
        print(write_metaquery_folder(args.out, args.size))


if __name__ == "__main__":
    main()
