import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unipic_core.inference.schedule import denoise_sigmas, dynamic_shift_mu, flow_sigmas


@pytest.mark.parametrize("steps", [1, 4, 10, 28, 50])
def test_static_shift_schedule_equals_diffusers_exactly(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    ours = flow_sigmas(steps, dict(scheduler.config))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, scheduler.sigmas)
    assert torch.equal(ours[:-1] * 1000, scheduler.timesteps)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_dynamic_shift_schedule_equals_diffusers_exactly(seq_len):
    config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    # diffusers' SD3 pipeline computes mu this way before calling set_timesteps
    m = (1.15 - 0.5) / (4096 - 256)
    mu = seq_len * m + (0.5 - m * 256)
    assert dynamic_shift_mu(seq_len, dict(scheduler.config)) == mu
    scheduler.set_timesteps(20, mu=mu)
    assert torch.equal(flow_sigmas(20, dict(scheduler.config), image_seq_len=seq_len), scheduler.sigmas)


def test_denoise_takes_the_tail_of_a_longer_schedule():
    config = {"shift": 3.0}
    tail = denoise_sigmas(10, 0.5, config)
    assert torch.equal(tail, flow_sigmas(20, config)[-11:])
    assert tail[0] < 1.0 and tail[-1] == 0.0


def test_bad_schedule_arguments_are_named():
    with pytest.raises(ValueError, match="denoise"):
        denoise_sigmas(10, 0.0, {"shift": 3.0})
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(10, {"use_dynamic_shifting": True})
