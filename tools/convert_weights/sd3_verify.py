"""Model-level check of a converted SD3 folder: torch and Flax on the same seeded inputs, piece by piece.

`sd3 --verify` runs it after the tensor check (sd3.py imports this module only then; this module imports
flux_verify, whose helpers it reuses, and never sd3.py). The transformer runs as flux_verify runs Flux's: the
input embedders, each block and the output, every piece fed the torch reference's activations so errors do not
compound and the worst block is the wrong one; a block's torch weights are read from the source files only when
it runs. The CLIP text towers (with projection) and the VAE run whole; when they come from a section of a single
file (sd3_single.py), their torch reference is that section, renamed as the converter renames it, written to a
temporary diffusers / transformers folder. The T5 encoder gets the tensor check only: flux_verify's T5 check
reads the component it converts for Flux (text_encoder_2), not SD3's text_encoder_3.
Reports, tolerance, and the rounding of the torch weights to a narrower stored dtype are flux_verify's.
"""
import contextlib
import dataclasses
import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from tqdm import tqdm

from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.layers import clip_text
from jax_inpaint_rl.models.sd3 import transformer as st
from tools.convert_weights import flux
from tools.convert_weights import flux_verify as fv
from tools.convert_weights.flux import Component
from tools.convert_weights.flux_verify import Result, errors

BLOCKS = "transformer_blocks"  # the report's group of blocks, named by diffusers' indices


class TransformerCheck:
    """The transformer piece by piece; `self.img`, `self.txt`, `self.temb` carry the torch activations. One torch
    block per run of equal blocks is reused, so at most one block's weights per run are held.

    The torch reference's position table is the exact one our model builds: the stored table was compared with
    it at conversion, and a bfloat16 one would otherwise put its rounding into every piece."""

    def __init__(self, component: Component, dst: str):
        from diffusers import SD3Transformer2DModel

        self.config = c = st.SD3Config.from_diffusers(component.config, component.source)
        with torch.device("meta"):
            self.reference = SD3Transformer2DModel.from_config(component.config)
        self.ours = fv.ConvertedParams(dst, "transformer")
        self.source = fv.SourceTensors(component, self.ours.dtype)
        self.where = component.source
        rng, (rows, cols) = np.random.default_rng(fv.SEED), fv.IMAGE_GRID
        self.inputs = dict(
            latents=rng.standard_normal((1, rows * c.patch_size, cols * c.patch_size, c.in_channels), np.float32),
            timestep=np.array([700.0], np.float32),
            text=rng.standard_normal((1, fv.TEXT_TOKENS, c.joint_attention_dim), np.float32),
            pooled=rng.standard_normal((1, c.pooled_projection_dim), np.float32))

    def torch_piece(self, module: torch.nn.Module, prefix: str, given=None) -> torch.nn.Module:
        """`module` holding the source tensors named `prefix`*, except those `given` ({name after prefix: tensor})."""
        given = given or {}
        state = {**self.source.state(prefix, tuple(given)), **given}
        return fv.load(module, state, f"{self.where} ({prefix}*)")

    def embedders(self) -> list[tuple[str, tuple[float, float]]]:
        """pos_embed, context_embedder, time_text_embed; sets the activations the first block sees."""
        c, x, ref, size = self.config, self.inputs, self.reference, self.config.pos_embed_max_size
        table = {"pos_embed": torch.from_numpy(st.position_embedding(c, size, size)[None])}
        latents = torch.from_numpy(np.ascontiguousarray(x["latents"].transpose(0, 3, 1, 2)))
        self.img = fv.run_torch(self.torch_piece(ref.pos_embed, "pos_embed.", table), latents)
        self.txt = fv.run_torch(self.torch_piece(ref.context_embedder, "context_embedder."), fv.tensor(x["text"]))
        self.temb = fv.run_torch(self.torch_piece(ref.time_text_embed, "time_text_embed."), fv.tensor(x["timestep"]),
                                 fv.tensor(x["pooled"]))
        img = fv.applied(st.PatchEmbed(c, jnp.float32))(self.ours.tree("pos_embed"), x["latents"])
        txt = fv.applied(nn.Dense(c.caption_projection_dim))(self.ours.tree("context_embedder"), x["text"])
        temb = fv.applied(st.TimeTextEmbed(c.inner_dim, jnp.float32))(self.ours.tree("time_text_embed"),
                                                                      x["timestep"], x["pooled"])
        return [("pos_embed", errors(img, self.img)), ("context_embedder", errors(txt, self.txt)),
                ("time_text_embed", errors(temb, self.temb))]

    def block(self, run: st.BlockRun, row: int, apply) -> tuple[float, float]:
        block = self.torch_piece(self.reference.transformer_blocks[run.first], f"transformer_blocks.{run.first + row}.")
        txt, img = fv.run_torch(block, hidden_states=fv.tensor(self.img), encoder_hidden_states=fv.tensor(self.txt),
                                temb=fv.tensor(self.temb))
        (img_got, txt_got), _ = apply(self.ours.tree(run.name, row), (self.img, self.txt), self.temb)
        self.img = img
        if run.context_pre_only:  # the last block's text is not an output
            return errors(img_got, img)
        self.txt = txt
        return fv.worst(errors(img_got, img), errors(txt_got, txt))

    def output(self) -> tuple[float, float]:
        """norm_out + proj_out + unpatchify (the tail of SD3Transformer.__call__, restated from its pieces)."""
        c, ref, (rows, cols) = self.config, self.reference, fv.IMAGE_GRID
        norm, proj = self.torch_piece(ref.norm_out, "norm_out."), self.torch_piece(ref.proj_out, "proj_out.")
        tokens = fv.run_torch(lambda img, temb: proj(norm(img, temb)), fv.tensor(self.img), fv.tensor(self.temb))
        expected = st.unpatchify(tokens, rows, cols, c.patch_size)  # on numpy: diffusers' tile order, channels-last

        def tail(params, img, temb):
            scale, shift = ft.Modulation(2, jnp.float32).apply({"params": params["norm_out"]}, temb)
            img = ft.modulate(ft.layer_norm(img), shift, scale)
            out = nn.Dense(c.patch_size ** 2 * c.output_channels).apply({"params": params["proj_out"]}, img)
            return st.unpatchify(out, rows, cols, c.patch_size)

        params = {"norm_out": self.ours.tree("norm_out"), "proj_out": self.ours.tree("proj_out")}
        return errors(jax.jit(tail)(params, self.img, self.temb), expected)


def check_transformer(component: Component, dst: str) -> list[Result]:
    check = TransformerCheck(component, dst)
    results = [Result("transformer", name, name, *pair) for name, pair in check.embedders()]
    with tqdm(total=check.config.num_layers, desc="transformer blocks", unit="block") as progress:
        for run in st.block_runs(check.config):
            apply = fv.applied(st.JointBlock(check.config, run.dual_attention, run.context_pre_only, jnp.float32))
            for row in range(run.length):
                results.append(Result("transformer", BLOCKS, f"{BLOCKS}/{run.first + row}",
                                      *check.block(run, row, apply)))
                progress.update()
    return results + [Result("transformer", "norm_out + proj_out", "norm_out + proj_out", *check.output())]


@contextlib.contextmanager
def as_folder(component: Component, weights: str):
    """The component itself when its source is a model folder; else (a single file's section) the component
    with its tensors, in torch names, and config written to a temporary folder (`weights`: the file name
    from_pretrained reads)."""
    if os.path.isdir(component.source):
        yield component
        return
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="sd3_verify_") as folder:
        save_file({k: np.ascontiguousarray(v) for k, v in component.tensors()}, os.path.join(folder, weights))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(dict(component.config), f)
        yield dataclasses.replace(component, source=folder)


def check_vae(component: Component, dst: str) -> list[Result]:
    with as_folder(component, "diffusion_pytorch_model.safetensors") as folder:
        return fv.check_vae(folder, dst)


def check_clip(component: Component, dst: str, name: str) -> list[Result]:
    """A CLIP text tower with projection over a full-length random prompt ending in EOS: the last and the
    penultimate hidden states (SD3's prompt embedding) and text_embeds (its pooled one)."""
    from transformers import CLIPTextModelWithProjection

    ours = fv.ConvertedParams(dst, name)
    with as_folder(component, "model.safetensors") as folder:
        reference = fv.round_parameters(CLIPTextModelWithProjection.from_pretrained(folder.source).float().eval(),
                                        ours.dtype)
    config = clip_text.CLIPTextConfig.from_transformers(component.config, component.source)
    ids = np.random.default_rng(fv.SEED).integers(0, config.vocab_size - 1, (1, config.max_position_embeddings))
    ids[:, -1] = config.vocab_size - 1 if config.eos_token_id == 2 else config.eos_token_id
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), output_hidden_states=True)
    got = fv.applied(clip_text.CLIPTextTransformer(config))(ours.tree(), ids.astype(np.int32))
    pairs = (("hidden states", "last_hidden_state", expected.last_hidden_state),
             ("penultimate hidden states", "penultimate_hidden_state", expected.hidden_states[-2]),
             ("text_embeds", "text_embeds", expected.text_embeds))
    return [Result(name, label, label, *errors(got[key], ref.numpy())) for label, key, ref in pairs]


CHECKS = {"transformer": check_transformer, "vae": check_vae,
          "text_encoder": lambda component, dst: check_clip(component, dst, "text_encoder"),
          "text_encoder_2": lambda component, dst: check_clip(component, dst, "text_encoder_2")}


def check_models(components: dict[str, Component], dst: str, tolerance: float = flux.VERIFY_TOLERANCE) -> list[Result]:
    """flux_verify.check_models with SD3's checks (the T5 gets the tensor check only)."""
    return fv.check_models(components, dst, tolerance, CHECKS)
