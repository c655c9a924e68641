"""Model-level check of a converted Qwen-Image folder: torch and Flax on the same seeded inputs, piece by piece.

`qwen-image-edit --verify` runs it after the tensor check (qwen_image_cli.py imports this module only then; this
module imports the converters and flux_verify, whose helpers it reuses). Each piece runs in float32 twice, as its
torch reference (diffusers / transformers) and as our Flax module, and every piece is fed the torch reference's
activations at its input, so errors do not compound and the worst piece is the wrong one. Reports, tolerance and
the rounding of the torch weights to a narrower stored dtype are flux_verify's.

- transformer (20B): img_in, txt_norm + txt_in, time_text_embed, each block, norm_out + proj_out. The blocks see
  a target grid and one reference grid (IMG_SHAPES: frame index 1, odd sides), text with padding, the RoPE
  diffusers' QwenEmbedRope builds for those shapes, and under `zero_cond_t` (Edit-2511) the doubled timestep
  embedding and per-token modulation index, as QwenImageTransformer2DModel.forward builds them.
- vae (0.13B): whole: the posterior mean of a random image 8 latents a side, and the decode of the reference's
  mean, through diffusers' AutoencoderKLQwenImage on one-frame (B, C, 1, H, W) videos.
- text_encoder (Qwen2.5-VL, 8B): the vision tower's patch embed (in the processor's patch order), each vision block
  (in the window order, with transformers' cu_seqlens (windows, or whole frames for the full-attention blocks) and
  its 2-D rotary table, over a two-image grid set that spans several windows and two frames), the merger (back in
  patch order); the language model's embedding (only the rows of the seeded ids: the 545M-entry table is never
  read whole), each decoder layer (transformers' causal mask for a right-padded prompt and the multimodal rotary
  table of seeded, per-axis different (3, 1, L) position ids), the final norm.
A piece's torch weights are read from the source files only when it runs (fv.SourceTensors: one block's at a
time), ours are its row of the converted, stacked file; the torch modules are built with their parameters on the
meta device and their buffers (RoPE tables) real.

Cost, measured on a shared 2-core CPU VM with random full-width pieces (two Qwen-Image blocks, two Qwen2.5-VL-7B
decoder layers and vision blocks, the released VAE; bf16 sources converted to float32; no real weights were
available), per piece after the first (which compiles): a transformer block 4.4 s (torch 0.6 - 1.3 s, JAX 0.6 s,
the rest reading its 2 GB from both files), a decoder layer 2.6 s, a vision block 0.2 - 0.8 s, the VAE 36 s;
about 7 minutes for the 60 + 28 + 32 pieces. On that VM, whose first touch of freshly allocated memory costs up to
4 s per GB, one piece in two took 4 - 5x longer (18 - 26 s a block, 9 - 13 s a layer): up to 30 minutes. Stored
as bfloat16 (a cast on both sides), 25 - 51 s a block and 9 - 20 s a layer under the same load. Peak RSS: 3.8 GB
for the transformer (one block's weights in float32 on each side, plus JAX's copy), 3.6 GB for the text encoder,
1.9 GB for the VAE (each with ~1 GB of libraries).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from tqdm import tqdm

from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.qwen_image import transformer as qt
from jax_inpaint_rl.models.qwen_image import vae as qvae
from jax_inpaint_rl.models.qwen_vl import language, vision
from jax_inpaint_rl.models.qwen_vl.model import QwenVLConfig
from tools.convert_weights import flux, qwen_image, qwen_image_vae, qwen_vl
from tools.convert_weights import flux_verify as fv
from tools.convert_weights.flux import Component
from tools.convert_weights.flux_verify import Result, errors, tensor

IMG_SHAPES = ((1, 4, 4), (1, 3, 5))  # (frame, h, w) patch grids: the target, then one reference image
TEXT_TOKENS, TEXT_PADDING = 8, 2  # the last TEXT_PADDING text tokens are padding (mask 0)
SIGMA = 0.7
BLOCKS = "transformer_blocks"  # diffusers' and our name of the block stack; the report's group of blocks


def skeleton(build):
    """A torch model built with its parameters on the meta device (no memory) and its other tensors real (the RoPE
    tables diffusers and transformers compute at construction); a piece gets its weights with fv.load."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def text_mask() -> np.ndarray:
    """(1, TEXT_TOKENS) bool: tokens, then TEXT_PADDING padding slots."""
    return (np.arange(TEXT_TOKENS) < TEXT_TOKENS - TEXT_PADDING)[None]


def pieces(source: fv.SourceTensors, where: str):
    """module, prefix -> `module` holding the source tensors named `prefix`*."""
    return lambda module, prefix: fv.load(module, source.state(prefix), f"{where} ({prefix}*)")


# --- the transformer ---------------------------------------------------------------------------------

class TransformerCheck:
    """The transformer piece by piece; `self.txt`, `self.img`, `self.temb` carry the torch activations."""

    def __init__(self, component: Component, dst: str):
        from diffusers import QwenImageTransformer2DModel
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

        self.config = c = qt.QwenImageConfig.from_diffusers(component.config, component.source)
        self.reference = skeleton(lambda: QwenImageTransformer2DModel.from_config(component.config))
        self.ours = fv.ConvertedParams(dst, qwen_image.NAME)
        self.piece = pieces(fv.SourceTensors(component, self.ours.dtype), component.source)
        rng = np.random.default_rng(fv.SEED)
        self.inputs = dict(hidden=rng.standard_normal((1, qt.image_tokens(IMG_SHAPES), c.in_channels), np.float32),
                           text=rng.standard_normal((1, TEXT_TOKENS, c.joint_attention_dim), np.float32),
                           mask=text_mask())
        # as QwenImageTransformer2DModel.forward: zero_cond_t doubles the batch of timesteps (the sample's, then
        # 0 for the reference images) and gives each image token its row (modulate_index)
        target = math.prod(IMG_SHAPES[0])
        self.target_tokens = target if c.zero_cond_t else None
        self.sigma = np.array([SIGMA, 0.0] if c.zero_cond_t else [SIGMA], np.float32)
        self.modulate_index = torch.tensor([[0] * target + [1] * (qt.image_tokens(IMG_SHAPES) - target)],
                                           dtype=torch.int) if c.zero_cond_t else None
        text_len, _, self.torch_mask = compute_text_seq_len_from_mask(tensor(self.inputs["text"]),
                                                                      torch.from_numpy(self.inputs["mask"]))
        self.rotary = self.reference.pos_embed([list(IMG_SHAPES)], max_txt_seq_len=text_len, device=torch.device("cpu"))
        # ours, as QwenImageTransformer.__call__ builds them
        positions = np.concatenate([qt.text_positions(IMG_SHAPES, TEXT_TOKENS), qt.image_positions(IMG_SHAPES)])
        self.cos, self.sin = ft.rope_tables(positions, c.axes_dims_rope, qt.ROPE_THETA)
        image_keys = np.ones((1, qt.image_tokens(IMG_SHAPES)), bool)
        self.keep = np.concatenate([self.inputs["mask"], image_keys], axis=1)[:, None, None, :]

    def embedders(self) -> list[tuple[str, tuple[float, float]]]:
        """img_in, txt_norm + txt_in, time_text_embed; sets the activations the first block sees."""
        c, x, ref, piece = self.config, self.inputs, self.reference, self.piece
        self.img = fv.run_torch(piece(ref.img_in, "img_in."), tensor(x["hidden"]))
        norm, project = piece(ref.txt_norm, "txt_norm."), piece(ref.txt_in, "txt_in.")
        self.txt = fv.run_torch(lambda text: project(norm(text)), tensor(x["text"]))
        self.temb = fv.run_torch(piece(ref.time_text_embed, "time_text_embed."), tensor(self.sigma), tensor(self.img))

        def text_in(params, text):
            normed = ft.RMSNorm().apply({"params": params["txt_norm"]}, text)
            return nn.Dense(c.inner_dim).apply({"params": params["txt_in"]}, normed)

        img = fv.applied(nn.Dense(c.inner_dim))(self.ours.tree("img_in"), x["hidden"])
        txt = jax.jit(text_in)({"txt_norm": self.ours.tree("txt_norm"), "txt_in": self.ours.tree("txt_in")}, x["text"])
        temb = fv.applied(qt.TimestepEmbed(c.inner_dim, jnp.float32))(self.ours.tree("time_text_embed"), self.sigma)
        return [("img_in", errors(img, self.img)), ("txt_norm + txt_in", errors(txt, self.txt)),
                ("time_text_embed", errors(temb, self.temb))]

    def block(self, index: int, apply) -> tuple[float, float]:
        block = self.piece(self.reference.transformer_blocks[0], f"{BLOCKS}.{index}.")
        txt, img = fv.run_torch(block, hidden_states=tensor(self.img), encoder_hidden_states=tensor(self.txt),
                                encoder_hidden_states_mask=self.torch_mask, temb=tensor(self.temb),
                                image_rotary_emb=self.rotary, modulate_index=self.modulate_index)
        (txt_got, img_got), _ = apply(self.ours.tree(BLOCKS, index), (self.txt, self.img), self.temb,
                                      self.cos, self.sin, self.keep)
        self.txt, self.img = txt, img
        return fv.worst(errors(txt_got, txt), errors(img_got, img))

    def output(self) -> tuple[float, float]:
        """norm_out + proj_out on the sample's temb rows (the tail of QwenImageTransformer.__call__)."""
        c, ref = self.config, self.reference
        norm, proj = self.piece(ref.norm_out, "norm_out."), self.piece(ref.proj_out, "proj_out.")
        temb = np.array(qt.sample_rows(self.temb, self.target_tokens))
        expected = fv.run_torch(lambda img, rows: proj(norm(img, rows)), tensor(self.img), tensor(temb))

        def tail(params, img, rows):
            scale, shift = ft.Modulation(2, jnp.float32).apply({"params": params["norm_out"]}, rows)
            return nn.Dense(c.output_channels).apply({"params": params["proj_out"]},
                                                     ft.modulate(ft.layer_norm(img), shift, scale))

        params = {"norm_out": self.ours.tree("norm_out"), "proj_out": self.ours.tree("proj_out")}
        return errors(jax.jit(tail)(params, self.img, temb), expected)


def check_transformer(component: Component, dst: str) -> list[Result]:
    check = TransformerCheck(component, dst)
    c = check.config
    apply = fv.applied(qt.Block(c, jnp.float32, check.target_tokens))
    results = [Result("transformer", name, name, *pair) for name, pair in check.embedders()]
    for index in tqdm(range(c.num_layers), desc="transformer blocks", unit="block"):
        results.append(Result("transformer", BLOCKS, f"{BLOCKS}/{index}", *check.block(index, apply)))
    return results + [Result("transformer", "norm_out + proj_out", "norm_out + proj_out", *check.output())]


# --- the VAE, whole ----------------------------------------------------------------------------------

def one_frame(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) -> diffusers' one-frame video (B, C, 1, H, W)."""
    return tensor(images.transpose(0, 3, 1, 2))[:, :, None]


def channels_last(video: torch.Tensor) -> np.ndarray:
    return video[:, :, 0].numpy().transpose(0, 2, 3, 1)


def check_vae(component: Component, dst: str) -> list[Result]:
    """Encode a random image (8 latents a side) to the posterior mean, decode the reference's mean."""
    from diffusers import AutoencoderKLQwenImage

    ours = fv.ConvertedParams(dst, qwen_image_vae.NAME)
    reference = fv.round_parameters(AutoencoderKLQwenImage.from_pretrained(component.source).float().eval(),
                                    ours.dtype)
    config = qvae.QwenVAEConfig.from_diffusers(component.config, component.source)
    size = 8 * config.downscale
    image = np.random.default_rng(fv.SEED).uniform(-1, 1, (1, size, size, config.input_channels)).astype(np.float32)
    with torch.no_grad():
        mean = reference.encode(one_frame(image)).latent_dist.mean
        decoded = channels_last(reference.decode(mean).sample)
    mean = channels_last(mean)
    model, params = qvae.QwenImageVAE(config), ours.tree()
    got_mean, _ = fv.applied(model, qvae.QwenImageVAE.encode)(params, image)
    got_decoded = fv.applied(model, qvae.QwenImageVAE.decode)(params, mean)
    return [Result("vae", "encode mean", "encode mean", *errors(got_mean, mean)),
            Result("vae", "decode", "decode", *errors(got_decoded, decoded))]


# --- the text encoder (Qwen2.5-VL) -------------------------------------------------------------------

def vision_grids(config: vision.VisionConfig) -> tuple[tuple[int, int, int], ...]:
    """Two images' (t, h, w) patch grids: one spanning 2 x 3 windows (the right and bottom ones partial), and a
    two-frame one of 2 x 2 merge groups (full attention is per frame)."""
    m, size = config.spatial_merge_size, config.window_merges
    return (1, m * (size + 1), m * (2 * size + 1)), (2, 2 * m, 2 * m)


class TextEncoderCheck:
    """Qwen2.5-VL piece by piece: `vision()` and `language()` each carry the torch activations through."""

    def __init__(self, component: Component, dst: str):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        self.config = QwenVLConfig.from_transformers(component.config, component.source)
        reference = skeleton(lambda: Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig.from_dict(component.config)))
        self.visual, self.language_model = reference.model.visual, reference.model.language_model
        self.ours = fv.ConvertedParams(dst, qwen_vl.NAME)
        self.source = fv.SourceTensors(component, self.ours.dtype)
        self.piece = pieces(self.source, component.source)
        self.language_prefix, self.vision_prefix = qwen_vl.LAYOUTS[component.layout]
        self.rng = np.random.default_rng(fv.SEED)

    def vision(self) -> list[Result]:
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, \
            get_vision_window_index

        c, visual, p = self.config.vision, self.visual, self.vision_prefix
        grids = vision_grids(c)
        patches = self.rng.standard_normal((sum(math.prod(g) for g in grids), c.patch_dim)).astype(np.float32)
        # as Qwen2_5_VisionTransformerPretrainedModel.forward builds them
        grid_thw = torch.tensor(grids)
        cu_frames, _ = get_vision_attention_seqlens(grid_thw, visual.config)
        window_index, cu_windows = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                           visual.patch_size)
        embedded = fv.run_torch(self.piece(visual.patch_embed, f"{p}patch_embed."), tensor(patches))
        hidden = visual.permute_input_for_window_attn(torch.from_numpy(embedded), window_index, len(embedded))
        rotary = tuple(visual.permute_input_for_window_attn(table, window_index, len(embedded)) for table in
                       visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size)))
        # ours, as VisionTransformer.__call__ builds them
        seq = vision.layout(c, grids)
        rope = ft.rope_tables(seq.positions, (c.head_dim // 2,) * 2, c.rope_theta)
        got = fv.applied(nn.Dense(c.hidden_size, use_bias=False))(self.ours.tree("visual/patch_embed"), patches)
        results = [Result(qwen_vl.NAME, "visual/patch_embed", "visual/patch_embed", *errors(got, embedded))]

        hidden = hidden.numpy()
        apply = fv.applied(vision.Block(c, jnp.float32))
        for index in tqdm(range(c.depth), desc="vision blocks", unit="block"):
            full = index in visual.fullatt_block_indexes
            out = fv.run_torch(self.piece(visual.blocks[0], f"{p}blocks.{index}."), tensor(hidden),
                               cu_seqlens=cu_frames if full else cu_windows, position_embeddings=rotary)
            got, _ = apply(self.ours.tree("visual/blocks", index), hidden, rope, (seq.windows, seq.frames),
                           index in c.fullatt_block_indexes)
            results.append(Result(qwen_vl.NAME, "visual/blocks", f"visual/blocks/{index}", *errors(got, out)))
            hidden = out
        merged = fv.run_torch(self.piece(visual.merger, f"{p}merger."), tensor(hidden))
        merged = merged[np.argsort(window_index.numpy())]
        got = fv.applied(vision.PatchMerger(c, jnp.float32))(self.ours.tree("visual/merger"), hidden)
        got = np.asarray(got)[np.argsort(seq.merge_order)]
        return results + [Result(qwen_vl.NAME, "visual/merger", "visual/merger", *errors(got, merged))]

    def embedding_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source rows, converted rows) of the embedding at `ids`, read row by row from each file."""
        name = f"{self.language_prefix}embed_tokens.weight"
        key = self.source.origin[name]
        read = self.source.readers[key][0]
        source = np.stack([self.source.as_stored(read(key, int(i))).numpy() for i in ids])
        path = f"{qwen_vl.NAME}/language_model/embed_tokens/embedding"
        return source, np.stack([np.asarray(self.ours.leaf(path, int(i))) for i in ids])

    def language(self) -> list[Result]:
        from transformers.masking_utils import create_causal_mask

        c, lm, p = self.config.text, self.language_model, self.language_prefix
        ids = self.rng.integers(0, c.vocab_size, TEXT_TOKENS)
        rows, inverse = np.unique(ids, return_inverse=True)
        source_rows, our_rows = self.embedding_rows(rows)
        hidden = torch.nn.functional.embedding(torch.from_numpy(inverse), torch.from_numpy(source_rows))[None].numpy()
        got = fv.applied(nn.Embed(len(rows), c.hidden_size))({"embedding": our_rows}, inverse[None])
        results = [Result(qwen_vl.NAME, "language_model/embed_tokens", "language_model/embed_tokens",
                          *errors(got, hidden))]

        # seeded multimodal positions, different on each axis; a right-padded prompt; as Qwen2_5_VLTextModel.forward
        positions = np.sort(self.rng.integers(0, 4 * TEXT_TOKENS, (3, 1, TEXT_TOKENS)), axis=-1)
        mask = text_mask().astype(np.int64)
        rotary = lm.rotary_emb(tensor(hidden), torch.from_numpy(positions))
        causal = create_causal_mask(config=lm.config, inputs_embeds=tensor(hidden),
                                    attention_mask=torch.from_numpy(mask), cache=None)
        cos, sin = language.rope_tables(c, positions)
        our_mask, _ = language.causal_mask(mask, None, None)
        apply = fv.applied(language.DecoderLayer(c, jnp.float32))
        for index in tqdm(range(c.num_hidden_layers), desc="decoder layers", unit="layer"):
            out = fv.run_torch(self.piece(lm.layers[0], f"{p}layers.{index}."), tensor(hidden),
                               attention_mask=causal, position_embeddings=rotary)
            got, _ = apply(self.ours.tree("language_model/layers", index), hidden, cos, sin, our_mask, None, None)
            results.append(Result(qwen_vl.NAME, "language_model/layers", f"language_model/layers/{index}",
                                  *errors(got, out)))
            hidden = out
        final = fv.run_torch(self.piece(lm.norm, f"{p}norm."), tensor(hidden))
        got = fv.applied(ft.RMSNorm(c.rms_norm_eps))(self.ours.tree("language_model/norm"), hidden)
        return results + [Result(qwen_vl.NAME, "language_model/norm", "language_model/norm", *errors(got, final))]


def check_text_encoder(component: Component, dst: str) -> list[Result]:
    check = TextEncoderCheck(component, dst)
    return check.vision() + check.language()


CHECKS = {qwen_image.NAME: check_transformer, qwen_image_vae.NAME: check_vae, qwen_vl.NAME: check_text_encoder}


def check_models(components: dict[str, Component], dst: str, tolerance: float = flux.VERIFY_TOLERANCE) -> list[Result]:
    """flux_verify.check_models with the Qwen-Image checks and their seeded inputs."""
    inputs = (f"model check: float32 compute, seeded inputs (seed {fv.SEED}; transformer image grids {IMG_SHAPES}, "
              f"{TEXT_TOKENS} text tokens ({TEXT_PADDING} padding); text encoder {TEXT_TOKENS} tokens)")
    return fv.check_models(components, dst, tolerance, CHECKS, inputs)
