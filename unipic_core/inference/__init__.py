"""The path IMAGE -> LATENT -> IMAGE: images and the VAE (images), raw vs model-space latents (latents), the noise
schedule (schedule) and the flow-matching samplers (sampling)."""
