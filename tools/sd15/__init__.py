"""Stable Diffusion 1.5 and SDXL architectures in plain PyTorch, with the reference state-dict
key names.

unet.py         UNet2DConditionModel (diffusers layout): the denoiser / DMD2 generator, SD1.5's and
                (config-driven) SDXL's
vae.py          AutoencoderKL decode path (post_quant_conv + decoder); SDXL's VAE is the same
clip_text.py    CLIPTextModel (transformers layout): the text encoder; CLIPTextModelWithProjection
                and sdxl_text_conditioning(): SDXL's second encoder and its prompt conditioning
blocks.py       pieces the UNet and the VAE share (ResNet block, attention, up/down sampling)
config.py       config dicts -> resolved, validated arguments
sd15_configs.py, sdxl_configs.py  the published full-size configs
checkpoint_io.py  .safetensors / .bin reading, strict state-dict loading
diffusers_folder.py  a diffusers-format pipeline folder (model_index.json, unet/, vae/, ...)
schedule.py     the scheduler config's noise schedule and timesteps
bundle.py       writing a dmdserve bundle (docs/BUNDLE.md)

Every module is TorchScript-compatible (torch.jit.script) and holds no buffers, so its
state_dict() is exactly the reference checkpoint's key set.
"""
