"""GRPO training in the graph: prompt lists, edit pairs and the UniPic2 GRPO Trainer."""

from pathlib import Path

from ..unipic_core.training import training_data
from ..unipic_core.training.grpo import ALGORITHMS
from .host import folders, memory


class UniPic2PromptList:
    CATEGORY = "UniPic2/training"
    DESCRIPTION = ("Text-to-image training prompts: one per line (lines starting with # are skipped), and/or a file. "
                   "A line may be a GenEval-style JSON object ({\"tag\": ..., \"include\": [...], \"prompt\": ...}): "
                   "its prompt is trained, its requirements are what UniPic2 Object Reward checks.")
    RETURN_TYPES = ("UNIPIC2_PROMPTS",)
    RETURN_NAMES = ("prompts",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompts": ("STRING", {"multiline": True, "default": "a red apple on a table",
                                                    "tooltip": "One prompt per line, or a GenEval-style JSON line "
                                                    "(see the README) for the object reward."})},
                "optional": {"file": ("STRING", {"default": "", "tooltip": "Optional UTF-8 text file in ComfyUI's "
                                                 "input folder (path relative to it), one prompt per line, added "
                                                 "after the box's prompts."})}}

    def make(self, prompts, file=""):
        path = folders.input_path(file, "UniPic2 Prompt List", "file") if file.strip() else None
        return (training_data.read_prompts(prompts, path),)


class UniPic2EditPairs:
    CATEGORY = "UniPic2/training"
    DESCRIPTION = ("Edit training pairs: source images (a batch, or every image of a folder, sorted by name) with "
                   "one instruction per line, in the same order.")
    RETURN_TYPES = ("UNIPIC2_PROMPTS",)
    RETURN_NAMES = ("edit_pairs",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"instructions": ("STRING", {"multiline": True, "default": "make it brighter",
                                                         "tooltip": "One edit instruction per line, one per image."})},
                "optional": {"images": ("IMAGE", {"tooltip": "Source images (a batch)."}),
                             "folder": ("STRING", {"default": "", "tooltip": "Or a folder of source images inside "
                                                   "ComfyUI's input folder (path relative to it)."})}}

    def make(self, instructions, images=None, folder=""):
        if (images is None) == (not folder.strip()):
            raise ValueError("UniPic2 Edit Pairs: connect 'images' or give a 'folder', exactly one of them")
        sources = (list(images) if images is not None else training_data.read_folder_images(
            folders.input_path(folder, "UniPic2 Edit Pairs", "folder"), within=folders.input_folder()))
        return (training_data.edit_pairs(sources, training_data.prompt_lines(instructions)),)


def _int(default, low, high, tooltip):
    return ("INT", {"default": default, "min": low, "max": high, "tooltip": tooltip})


def _float(default, low, high, step, tooltip):
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


class UniPic2GRPOTrainer:
    CATEGORY = "UniPic2/training"
    DESCRIPTION = ("Trains a reward LoRA with online RL (Flow-GRPO, its fast variant, or DiffusionNFT): each step "
                   "samples a group of images per prompt, scores them, and pushes the LoRA toward the better ones. "
                   "Writes models/loras/unipic2/<lora_name>.safetensors (and a resumable .training-state) every save_every steps, at the end, on "
                   "Cancel and when an error stops a step. Never overwrites a LoRA it does not resume; resumes only "
                   "the same run (reward, data, seed, settings). Chain two trainers (edit pairs, then prompts) for "
                   "the paper's PDTR.")
    MAX_NAME = 100
    NAME_PUNCTUATION = " ._-"
    RETURN_TYPES = ("UNIPIC2_LORA", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "curves", "samples", "summary")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The UniPic2 DiT to train a LoRA for: Load UniPic2 Kontext / MetaQuery, "
                                "or Load Diffusion Model (any weight_dtype). Without LoRAs: to continue a LoRA, "
                                "connect it to 'lora'."}),
            "vae": ("VAE", {"tooltip": "Decodes samples for the reward and encodes edit sources."}),
            "prompts": ("UNIPIC2_PROMPTS", {"tooltip": "UniPic2 Prompt List (text-to-image) or Edit Pairs."}),
            "reward": ("UNIPIC2_REWARD", {"tooltip": "A reward node, or Combine Rewards."}),
            "lora_name": ("STRING", {"default": "unipic2_grpo", "tooltip": "File name under models/loras/unipic2: "
                                     "letters, digits, spaces, '.', '_', '-' (up to 100)."}),
            "steps": _int(20, 1, 100000, "Training steps: each samples, scores and updates the LoRA "
                          "(updates_per_step optimizer steps)."),
            "group_size": _int(16, 2, 256, "G: images per prompt compared with each other (paper: 16)."),
            "prompts_per_step": _int(1, 1, 256, "K: prompts (or edit pairs) per step."),
            "sampling_steps": _int(10, 1, 100, "T: SDE sampling steps per image (paper: 10)."),
            "noise_level": _float(0.7, 0.01, 2.0, 0.05, "SDE noise level a (paper: 0.7)."),
            "guidance": _float(3.5, 1.0, 30.0, 0.1, "CFG scale while sampling and training."),
            "beta": _float(0.04, 0.0, 10.0, 0.005, "KL weight against the model without the LoRA (paper: 0.04)."),
            "learning_rate": _float(3e-4, 1e-7, 1.0, 1e-5, "AdamW learning rate (paper: 3e-4)."),
            "lora_rank": _int(32, 1, 512, "LoRA rank r (paper: 32)."),
            "lora_alpha": _float(64.0, 0.01, 4096.0, 1.0, "LoRA alpha (paper: 64); scale = alpha / r."),
            "clip_range": _float(1e-4, 1e-6, 1.0, 1e-5, "PPO ratio clip epsilon (Flow-GRPO: 1e-4)."),
            "timestep_fraction": _float(0.99, 0.01, 1.0, 0.01, "Fraction of the T steps trained on (Flow-GRPO: 0.99)."),
            "advantage_std": (["group", "batch"], {"tooltip": "Normalise advantages by each group's std or the whole "
                                                    "step's."}),
            "resolution": _int(512, 64, 2048, "Text-to-image size (square); longer edge for editing (multiple of 32)."),
            "micro_batch": _int(0, 0, 256, "Images per DiT forward; 0 = a whole group. Lower it to save VRAM."),
            "updates_per_step": _int(2, 1, 256, "Optimizer steps per batch of samples (Flow-GRPO: 2); from the "
                                     "second on, the ratio moves off 1 and the clip range acts."),
            "seed": _int(0, 0, 2**31 - 1, "Seeds LoRA init, prompt order and all noise."),
            "save_every": _int(10, 0, 100000, "Checkpoint every N steps (0: only at the end / on Cancel)."),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from lora_name's checkpoint if there is one "
                                   "(same reward, data, seed and settings; steps, save_every, micro_batch, "
                                   "gradient_checkpointing and learning_rate may change). An existing LoRA is never "
                                   "overwritten otherwise."}),
            "negative_prompt": ("STRING", {"default": "", "tooltip": "Negative prompt for CFG."}),
            "algorithm": (list(ALGORITHMS), {"default": "flow-grpo", "tooltip": (
                "flow-grpo: the paper's Flow-GRPO: every sampling step stochastic, the first timestep_fraction of "
                "them trained with CFG (the update is ~2T DiT passes and backward per image, about 3x the sampling "
                "time). flow-grpo-fast: Flow-GRPO's fast variant: stochastic (CPS) steps only on a window of "
                "sde_window steps early in the schedule, deterministic elsewhere, and only the window trained: the "
                "update costs ~sde_window / T of flow-grpo's (its repository uses noise_level 0.8, guidance 1 and "
                "clip_range 1e-5 with it). diffusion-nft: DiffusionNFT: deterministic samples without CFG from a "
                "slowly following copy of the LoRA, trained on noised copies of the finished images at "
                "timestep_fraction of the T timesteps (guidance, noise_level, clip_range and beta are not used; "
                "nft_kl weights its velocity KL term; its repository takes updates_per_step 1).")}),
            "sde_window": _int(3, 1, 100, "flow-grpo-fast: how many consecutive steps are stochastic and trained "
                               "(its repository: 3 of 10, starting at random in the first half)."),
            "nft_beta": _float(1.0, 0.01, 10.0, 0.05, "diffusion-nft: how far its implicit positive and negative "
                               "policies reach past the old one (its repository: 1.0)."),
            "nft_kl": _float(1e-4, 0.0, 10.0, 1e-5, "diffusion-nft: weight of its KL term, the squared gap between "
                             "the LoRA's and the base model's velocities (its repository: 1e-4)."),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "In the update, keep only each DiT "
                                       "block's inputs and recompute the rest for the gradients: much less memory "
                                       "for about a third more update time. Off only when memory is plentiful."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}, "optional": {
            "text_encoders": ("UNIPIC2_TEXT", {"tooltip": "Kontext text encoders (connect this or mllm)."}),
            "mllm": ("UNIPIC2_MLLM", {"tooltip": "MetaQuery MLLM (connect this or text_encoders)."}),
            "lora": ("UNIPIC2_LORA", {"tooltip": "Start from this LoRA (e.g. the PDTR edit stage's). When resuming, "
                                      "it must be the LoRA the run started from."}),
        }}

    def train(self, model, vae, prompts, reward, lora_name, steps, group_size, prompts_per_step, sampling_steps,
              noise_level, guidance, beta, learning_rate, lora_rank, lora_alpha, clip_range, timestep_fraction,
              advantage_std, resolution, micro_batch, updates_per_step, seed, save_every, resume, negative_prompt,
              algorithm, sde_window, nft_beta, nft_kl, gradient_checkpointing, text_encoders=None, mllm=None, lora=None,
              node_id=None):
        # imported on first use: a graph that never trains need not load the training stack
        from ..unipic_core.training.grpo_settings import GRPOSettings
        from .host.native_training import train_lora

        if (text_encoders is None) == (mllm is None):
            raise ValueError("UniPic2 GRPO Trainer: connect exactly one of 'text_encoders' (Kontext) or 'mllm' "
                             "(MetaQuery)")
        if memory.fp8_fast(model):
            raise ValueError("UniPic2 GRPO Trainer: the model was loaded with weight_dtype fp8_e4m3fn_fast, which "
                             "multiplies in fp8 and cannot carry a trainable LoRA -- load it with fp8_e4m3fn (same "
                             "memory) or default to train")
        if memory.carries_weight_patches(model):  # the KL reference and the saved LoRA would silently include it
            raise ValueError("UniPic2 GRPO Trainer: the model carries weight patches (a LoRA loader or Apply LoRA); "
                             "connect that LoRA to the trainer's 'lora' input instead, to continue training it")
        lora_file = Path(folders.lora_folder()) / f"{self.check_lora_name(lora_name)}.safetensors"
        settings = GRPOSettings(
            steps=steps, algorithm=algorithm, sde_window=sde_window, nft_beta=nft_beta, nft_kl=nft_kl,
            gradient_checkpointing=gradient_checkpointing, group_size=group_size, prompts_per_step=prompts_per_step,
            sampling_steps=sampling_steps, noise_level=noise_level, guidance=guidance, beta=beta,
            learning_rate=learning_rate, lora_rank=lora_rank, lora_alpha=lora_alpha, clip_range=clip_range,
            batch_std=advantage_std == "batch", timestep_fraction=timestep_fraction, resolution=resolution,
            micro_batch=micro_batch, updates_per_step=updates_per_step, seed=seed, negative_prompt=negative_prompt,
            save_every=save_every)
        return train_lora(model, vae, prompts, reward, settings, lora_file, resume, lora, text_encoders, mllm, node_id)

    @classmethod
    def check_lora_name(cls, lora_name: str) -> str:
        """The stripped name, or a ValueError saying what is wrong with it (before any training or file write)."""
        name = lora_name.strip()
        odd = sorted({c for c in name if not (c.isalnum() or c in cls.NAME_PUNCTUATION)})
        if not name:
            problem = "is empty"
        elif len(name) > cls.MAX_NAME:
            problem = f"is {len(name)} characters long"
        elif name.startswith("."):
            problem = "starts with '.' (a hidden file)"
        elif odd:
            problem = "contains " + " ".join(map(repr, odd))
        else:
            return name
        raise ValueError(f"UniPic2 GRPO Trainer: lora_name '{lora_name}' {problem}; use up to {cls.MAX_NAME} letters, "
                         "digits, spaces, '.', '_' and '-', not starting with '.' (e.g. 'unipic2_grpo')")
