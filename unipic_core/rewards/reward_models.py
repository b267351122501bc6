"""Learned rewards as published: PickScore, CLIPScore and LAION's improved aesthetic predictor.

Each scores images [N, H, W, 3] in 0..1 (with their prompts) and returns float32 [N] on the CPU:
- PickScore (Kirstain et al., yuvalkirstain/PickScore_v1): logit_scale.exp() * cos(text embedding, image embedding)
  of a fine-tuned CLIP-H, read with laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor (its model card).
- CLIPScore (Hessel et al., jmhessel/clipscore): 2.5 * max(cos(text, image), 0), the text prefixed with
  "A photo depicts " as their reference does; here with openai/clip-vit-large-patch14.
- Aesthetic score (christophschuhmann/improved-aesthetic-predictor): an MLP on the L2-normalised CLIP ViT-L/14
  image embedding, about 1..10.
Images go through the CLIP image processor's PIL path (bicubic resize of the shorter side to 224, centre crop), the
preprocessing the three references use; the embeddings are compared in float32.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from ..inference.images import to_pil
from ..models.folders import is_clip_folder
from ..models.loading import CheckpointError, check_keys, check_safetensors_file, load_pretrained, weight_files
from ..models.repos import AESTHETIC_CHOICE, AESTHETIC_FILE, CLIP_L14_REPO

CLIPSCORE_WEIGHT = 2.5
CLIPSCORE_PREFIX = "A photo depicts "
TEXT_TOKENS = 77  # CLIP's context; longer prompts are truncated, as in the references


@dataclass
class CLIPReward:
    """A CLIPModel and the processor it was trained with."""

    model: CLIPModel
    processor: CLIPProcessor
    device: torch.device = torch.device("cpu")  # where it computes; ComfyUI's device under the host


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's head, with its state-dict names (layers.0/2/4/6/7): linear layers and
    dropout, no activations (the published linearMSE model). embeddings [N, embed_dim] -> scores [N]."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)[:, 0]


def check_processor_folder(folder: Path, repo: str, model: str = "CLIP") -> None:
    """A processor's files for a model that reads text with CLIP's tokenizer (CLIP itself, OWLv2)."""
    has_tokenizer = (folder / "tokenizer.json").exists() or (
        (folder / "vocab.json").exists() and (folder / "merges.txt").exists())
    if not (folder / "preprocessor_config.json").exists() or not has_tokenizer:
        raise CheckpointError(f"{folder} has no {model} processor files (preprocessor_config.json, and tokenizer.json "
                              f"or vocab.json + merges.txt); copy them from {repo} on the Hugging Face hub")


def load_clip_processor(folder: Path, repo: str) -> CLIPProcessor:
    check_processor_folder(folder, repo)
    return CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(str(folder)),
                         tokenizer=CLIPTokenizer.from_pretrained(str(folder)))


def load_clip_reward(folder: Path, processor_folder: Path | None = None, dtype: torch.dtype = torch.float32,
                     repo: str = CLIP_L14_REPO, processor_repo: str | None = None) -> CLIPReward:
    """A transformers CLIPModel folder (config.json + model.safetensors, strict keys) and its processor, from
    `processor_folder` or the model folder itself; errors name `repo` (`processor_repo` for the processor folder's
    files) as where to get the files."""
    folder = Path(folder)
    if not is_clip_folder(folder):
        raise CheckpointError(f"{folder} is not a transformers CLIP folder (config.json with model_type 'clip', "
                              f"model.safetensors); download {repo} from the Hugging Face hub")
    if processor_folder is None:
        processor_folder, processor_repo = folder, repo
    processor = load_clip_processor(Path(processor_folder), processor_repo or repo)
    weight_files(folder, "model")  # names a missing model.safetensors instead of transformers' generic error
    return CLIPReward(load_pretrained(CLIPModel, folder, dtype), processor)


def load_aesthetic_mlp(path: Path) -> AestheticMLP:
    """The predictor's state dict from its published .pth (or a .safetensors with the same keys), strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; download {AESTHETIC_FILE} from {AESTHETIC_CHOICE.rsplit('/', 1)[0]}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors_file(path)
        weights = load_file(str(path))
    else:
        try:
            weights = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch errors alike: the file is not a readable state dict
            raise CheckpointError(f"{path} is not a readable torch state dict ({err}); download it again") from err
    if not isinstance(weights, dict) or "layers.0.weight" not in weights:
        raise CheckpointError(f"{path} is not the improved aesthetic predictor's MLP (no 'layers.0.weight'); use "
                              f"{AESTHETIC_FILE}")
    mlp = AestheticMLP(weights["layers.0.weight"].shape[1])
    check_keys(path, set(mlp.state_dict()), set(weights), "the aesthetic MLP's layout (layers.0/2/4/6/7)")
    try:
        mlp.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # the right names with other shapes
        raise CheckpointError(f"{path}: weight shapes do not match the aesthetic MLP's layout "
                              f"({' '.join(str(err).split())}); use {AESTHETIC_FILE}") from err
    return mlp.float().eval().requires_grad_(False)


def check_aesthetic_pair(clip: CLIPReward, mlp: AestheticMLP, clip_name: str, mlp_name: str) -> None:
    width, wanted = clip.model.config.projection_dim, mlp.layers[0].in_features
    if width != wanted:
        raise CheckpointError(f"the aesthetic MLP {mlp_name} takes {wanted}-wide CLIP embeddings but {clip_name} "
                              f"makes {width}-wide ones; use {CLIP_L14_REPO} (ViT-L/14, 768)")


def normalised(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (a zero row stays zero, as the aesthetic reference does)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def image_embeddings(clip: CLIPReward, images: torch.Tensor) -> torch.Tensor:
    """images [N, H, W, 3] 0..1 -> normalised image embeddings [N, projection_dim] float32 on clip.device."""
    pixels = clip.processor.image_processor(images=[to_pil(image) for image in images],
                                            return_tensors="pt")["pixel_values"]
    pixels = pixels.to(clip.device, clip.model.dtype)
    return normalised(clip.model.get_image_features(pixel_values=pixels).pooler_output)


def text_embeddings(clip: CLIPReward, texts: list[str]) -> torch.Tensor:
    """N texts -> normalised text embeddings [N, projection_dim] float32 on clip.device."""
    tokens = clip.processor.tokenizer(texts, padding=True, truncation=True, max_length=TEXT_TOKENS,
                                      return_tensors="pt").to(clip.device)
    return normalised(clip.model.get_text_features(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens["attention_mask"]).pooler_output)


def cosines(clip: CLIPReward, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """cos(text_i, image_i) for each pair: [N] float32 on clip.device."""
    if len(texts) != len(images):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts; give one prompt per image")
    return (text_embeddings(clip, texts) * image_embeddings(clip, images)).sum(dim=-1)


@torch.no_grad()
def pickscore(clip: CLIPReward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore of each image for its prompt: logit_scale.exp() * cosine (about 18..24 for the real model)."""
    scale = clip.model.logit_scale.detach().float().exp().to(clip.device)  # a container's own weight: maybe on CPU
    return (scale * cosines(clip, images, prompts)).cpu()


@torch.no_grad()
def clip_score(clip: CLIPReward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """CLIPScore of each image for its prompt: 2.5 * max(cos, 0) with the reference's "A photo depicts " prefix."""
    cos = cosines(clip, images, [CLIPSCORE_PREFIX + prompt for prompt in prompts])
    return (CLIPSCORE_WEIGHT * cos.clamp(min=0)).cpu()


@torch.no_grad()
def aesthetic_score(clip: CLIPReward, mlp: AestheticMLP, images: torch.Tensor) -> torch.Tensor:
    """The predicted aesthetic rating of each image (the MLP on the normalised CLIP image embedding)."""
    embeddings = image_embeddings(clip, images)
    return mlp(embeddings.to(mlp.layers[0].weight.dtype)).float().cpu()
