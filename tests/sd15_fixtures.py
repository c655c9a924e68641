"""Tiny random diffusers / transformers SD1.5 components for the parity and converter tests.

Configs are small enough that every forward pass runs in well under a second on CPU; they vary the
knobs the port must honour (heads, head dim, cross-attention dim, layers, projections, norm groups).
"""
import numpy as np
import torch

WORDS = "abcdefghijklmnopqrstuvwxyz"

UNET_CONFIGS = {
    # SD1.5 inpainting shape: 9 input channels, heads per block, linear projections
    "inpaint_linear": dict(in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                           norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                           attention_head_dim=(2, 4), use_linear_projection=True),
    # 4 channels, conv projections, one head count for all, 2 layers per block
    "conv_proj": dict(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
                      norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                      attention_head_dim=2, use_linear_projection=False),
    # three levels, plain block first, 2 transformer layers in the middle level, odd latent size (upsampling to
    # the skip's size), sin-first time embedding with a frequency shift
    "three_level": dict(in_channels=9, out_channels=4, block_out_channels=(16, 24, 48), layers_per_block=1,
                        transformer_layers_per_block=(1, 2, 1),
                        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        cross_attention_dim=12, attention_head_dim=(1, 3, 6), flip_sin_to_cos=False, freq_shift=1),
}
UNET_SAMPLE_SIZE = {"inpaint_linear": 8, "conv_proj": 8, "three_level": 10}

VAE_CONFIGS = {
    "sd_like": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    # Flux-like: 16 latent channels, shift factor, no quant convs
    "flux_like": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=16,
                      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=16, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, mid_block_add_attention=False),
}

TEXT_CONFIGS = {
    # SD1.5-like legacy config: eos_token_id 2 means "EOS is the largest id" (argmax pooling)
    "legacy_eos": dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                       bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "gelu_eos_id": dict(vocab_size=60, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=6, max_position_embeddings=12, hidden_act="gelu",
                        bos_token_id=54, eos_token_id=55, pad_token_id=55),
    "one_head": dict(vocab_size=80, hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=1,
                     max_position_embeddings=20, hidden_act="quick_gelu", bos_token_id=78, eos_token_id=79,
                     pad_token_id=79, layer_norm_eps=1e-6),
}

# the pipeline test's components (VAE downscale 4: 32x32 images, 8x8 latents)
PIPE_UNET = dict(UNET_CONFIGS["inpaint_linear"], cross_attention_dim=32, sample_size=8)
PIPE_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def run_compiled(fn, *args):
    """jit `fn` with XLA's backend optimisation off (compiles ~2x faster on CPU; these tests are compile-bound)."""
    import jax

    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer over single letters (+ one merge): ids 0..53, BOS 56, EOS/pad 57 (the largest id)."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(WORDS)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(WORDS)})
    vocab.update({"ca": 52, "cat</w>": 53, "<|startoftext|>": 56, "<|endoftext|>": 57})
    vocab.update({f"<unused{i}>": i for i in (54, 55)})
    return CLIPTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")], model_max_length=max_length)


def torch_unet(name: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_norms(UNet2DConditionModel(**UNET_CONFIGS[name]).eval())


def torch_vae(config: dict, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_norms(AutoencoderKL(**config).eval())


def torch_text(config: dict, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return randomize_norms(CLIPTextModel(CLIPTextConfig(**config)).eval())


def randomize_norms(model, scale: float = 0.2):
    """Norm weights start at 1 / 0: perturb them (and every bias) so a swapped scale / bias cannot pass."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(scale * torch.randn_like(param))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref|: the parity metric every test bounds."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def save_tiny_pipeline(folder: str, seed: int = 0) -> None:
    """A StableDiffusionInpaintPipeline folder (DDIM as SD1.5 configures it, no safety checker)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = randomize_norms(UNet2DConditionModel(**PIPE_UNET))
    vae = randomize_norms(AutoencoderKL(**PIPE_VAE))
    text = randomize_norms(CLIPTextModel(CLIPTextConfig(**dict(TEXT_CONFIGS["legacy_eos"], vocab_size=58))))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder)
