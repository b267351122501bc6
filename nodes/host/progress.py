"""ComfyUI's progress bar (with latent previews) and its Cancel button, for sampling, training and downloads."""

import comfy.model_management  # for the interrupt flag ComfyUI keeps there; the memory manager is memory.py's
import comfy.utils


def cancel_requested() -> bool:
    return comfy.model_management.processing_interrupted()


def check_cancel() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def download_progress():
    """A tqdm class for hub downloads: the console bar as usual, mirrored on ComfyUI's progress bar."""
    from tqdm.auto import tqdm

    class ComfyProgress(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            total = max(int(self.total or 0), int(self.n), 1)
            if not hasattr(self, "comfy_bar"):
                self.comfy_bar = comfy.utils.ProgressBar(total)
            self.comfy_bar.update_absolute(int(self.n), total)
            return shown

    return ComfyProgress


def sampling_callback(model, steps: int):
    """ComfyUI's sampler callback (progress bar with latent previews, as KSampler's) that also stops at the end of
    the step during which the user pressed Cancel."""
    import latent_preview

    show = latent_preview.prepare_callback(model, steps)

    def callback(step, x0, x, total_steps):
        show(step, x0, x, total_steps)
        check_cancel()

    return callback


def progress_bar(total: int) -> comfy.utils.ProgressBar:
    """ComfyUI's progress bar on the running node; update_absolute(done, total) moves it."""
    return comfy.utils.ProgressBar(total)
