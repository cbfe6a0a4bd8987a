"""Stable Diffusion 1.5 architecture in plain PyTorch, with the reference state-dict key names.

unet.py         UNet2DConditionModel (diffusers layout): the denoiser / DMD2 generator
vae.py          AutoencoderKL decode path (post_quant_conv + decoder)
clip_text.py    CLIPTextModel (transformers layout): the text encoder
blocks.py       pieces the UNet and the VAE share (ResNet block, attention, up/down sampling)
config.py       config dicts -> resolved, validated arguments
checkpoint_io.py  .safetensors / .bin reading, strict state-dict loading
diffusers_folder.py  a diffusers-format pipeline folder (model_index.json, unet/, vae/, ...)
schedule.py     the scheduler config's noise schedule and timesteps
bundle.py       writing a dmdserve bundle (docs/BUNDLE.md)

Every module is TorchScript-compatible (torch.jit.script) and holds no buffers, so its
state_dict() is exactly the reference checkpoint's key set.
"""
