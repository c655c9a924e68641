"""SD3 / SD3.5 (diffusers folder or Stability's single file) -> a folder of Flax params the SD3 family reads.

    python -m tools.convert_weights sd3 --src SRC --dst DST [--components-from DIR] [--attention-head-dim N]
        [--dtype float32|bfloat16|float16] [--verify] [--tolerance 1e-4]

SRC is either
  - a diffusers pipeline folder: transformer/ (SD3Transformer2DModel), vae/, text_encoder/ (CLIP-L) and
    text_encoder_2/ (CLIP-G, both CLIPTextModelWithProjection), text_encoder_3/ (T5; optional: model_index.json
    may list it as null), tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/; or
  - Stability's original single .safetensors file (sd3_medium.safetensors, sd3.5_large.safetensors, ...):
    the MM-DiT under model.diffusion_model.* (fused qkv split, modulation halves reordered, its config inferred
    from the tensors; sd3_single.py), possibly with the VAE (first_stage_model.*) and the text encoders
    (text_encoders.clip_l / clip_g / t5xxl.transformer.*) inside.
    Alone it converts the transformer only (what export-sd3 reads; the folder is not a loadable family). With
    --components-from DIR, a diffusers SD3 folder, it writes a complete folder: the VAE and the text encoders
    the file holds are converted from the file with DIR's configs, the others come from DIR, and the
    tokenizers and scheduler are copied from DIR. CLIP-L's text_projection becomes the identity (SD3 uses its
    unprojected pooled output, as diffusers' single-file loader does). The head dim is stored only with QK norm
    (SD3.5); without it (SD3-Medium) it is --attention-head-dim, 64 by default as in every release.

Output folder (sd3.py): params/<component>.safetensors (keys '<component>/<flax path>'; the transformer's runs
of equal blocks stacked), <component>/config.json (for a single file: the transformer's inferred diffusers
config), tokenizer*/, scheduler/, sd3.json {"family": "sd3", "dtype", "source"[, "components_from"]}.
`--verify` re-reads every source tensor and checks the written one equals it (after the dtype cast), then runs
torch and Flax on the same seeded inputs (sd3_verify.py): the transformer piece by piece (embedders, each block,
output), both CLIPs and the VAE whole; the T5 gets the tensor check only. It fails when a relative error exceeds
--tolerance (1e-4). `python -m tools.convert_weights export-sd3` (sd3_export.py) writes the transformer back to
diffusers.
"""
# The docstring above is the subcommand's --help. This module is the command line; the conversion is sd3.py (and
# sd3_single.py for single files), the model check sd3_verify.py, imported only for --verify (torch).
import os

from tools.convert_weights import flux, sd3, sd3_single


def convert(src: str, dst: str, dtype: str = "float32", components_from: str | None = None,
            attention_head_dim: int | None = None, check_tensors: bool = False) -> dict[str, flux.Component]:
    """SRC (a folder or a single file) -> DST; returns the converted components for the model check."""
    if os.path.isdir(src):
        given = [flag for flag, value in (("--components-from", components_from),
                                          ("--attention-head-dim", attention_head_dim)) if value is not None]
        if given:
            raise ValueError(f"{src}: {' and '.join(given)} only apply to a single-file --src; a diffusers folder "
                             "holds every component and its config")
        return sd3.convert_pipeline(src, dst, dtype, check_tensors)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: neither a diffusers SD3 folder nor a single .safetensors file")
    components, notes = sd3_single.file_components(src, components_from, attention_head_dim)
    print("\n".join(notes))
    sd3.convert_components(components, dst, dtype, check_tensors)
    if components_from is not None:
        sd3.finish_folder(components_from, dst, dtype, "text_encoder_3" in components,
                          {"source": os.path.abspath(src), "components_from": os.path.abspath(components_from)})
    return components


def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True, help="diffusers SD3 / SD3.5 pipeline folder, or Stability's "
                        "single .safetensors file")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--components-from", default=None, metavar="DIR", help="single-file --src: a diffusers SD3 "
                        "folder giving the configs of the components the file holds, the components it lacks, the "
                        "tokenizers and the scheduler (without it only the transformer is converted)")
    parser.add_argument("--attention-head-dim", type=int, default=None, help="single-file --src without QK norm "
                        f"(SD3-Medium): the head dim, which such a file does not store (default "
                        f"{sd3_single.DEFAULT_HEAD_DIM}); with QK norm it is read from the file")
    parser.add_argument("--dtype", default="float32", choices=sorted(flux.OUTPUT_DTYPES), help="stored parameter dtype")
    parser.add_argument("--verify", action="store_true", help="re-read every source tensor and check the written "
                        "one equals it, then run torch and Flax on the same inputs (the transformer block by block) "
                        "and fail above --tolerance")
    parser.add_argument("--tolerance", type=float, default=flux.VERIFY_TOLERANCE, help="--verify fails when max "
                        "|diff| / max |torch output| of any output exceeds this (float32 compute)")


def run(args) -> None:
    components = convert(args.src, args.dst, args.dtype, args.components_from, args.attention_head_dim,
                         check_tensors=args.verify)
    if args.verify:
        from tools.convert_weights import sd3_verify  # torch, diffusers, transformers: only when checking

        sd3_verify.check_models(components, args.dst, args.tolerance)
    print(f"wrote {args.dst}")
