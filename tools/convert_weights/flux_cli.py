"""Flux.1 Fill / dev / Kontext checkpoints -> a folder `jax_inpaint_rl.models.flux.family.load` reads, and back.

    python -m tools.convert_weights flux-fill|flux-kontext|flux-dev --src SRC --dst DST
        [--transformer FILE_OR_DIR] [--dtype float32|bfloat16|float16] [--verify]

SRC is a diffusers pipeline folder (transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ (T5),
tokenizer/, tokenizer_2/, scheduler/). The transformer may instead come from the original single file
(`--transformer flux1-fill-dev.safetensors`, keys double_blocks.N.img_attn.qkv ...: fused projections
are split and renamed on the fly); a single file as SRC converts only the transformer.

Output folder:
  params/transformer.safetensors     keys 'transformer/<flax path>'; the 19 double / 38 single blocks
                                     stacked on a leading layer axis (e.g. transformer/double_blocks/attn/to_q/kernel)
  params/vae.safetensors             'vae/...'
  params/text_encoder.safetensors    'text_encoder/...'   CLIP-L text tower
  params/text_encoder_2.safetensors  'text_encoder_2/...' T5 encoder, blocks stacked
  transformer/, vae/, text_encoder/, text_encoder_2/   config.json of each source component
  tokenizer/, tokenizer_2/, scheduler/                  copied from the source
  <family>.json                      {"family", "dtype", "source"}
`--verify` re-reads every source tensor and checks the written one equals it (after the dtype cast), then
runs each component in torch and in Flax on the same seeded inputs (the transformer and T5 one block at a
time; see flux_verify.py) and fails when an output's relative error exceeds --tolerance (1e-4).
`python -m tools.convert_weights export-flux` (flux_export.py) writes the transformer back to diffusers.

Memory: the 12B transformer converts one tensor at a time. Source tensors are read with plain file
reads (no mmap, so nothing lingers in the resident set), transformed, and written straight into their
slot of an output safetensors file whose header is laid out up front from the model's expected shapes;
per-layer torch tensors land in their row of the stacked (scanned) Flax arrays. Peak memory is a few
copies of the largest single tensor. `export_transformer` streams the other way, to diffusers' layout.
"""
# The docstring above is the subcommands' --help. Modules: this one is the command line, and runs the model
# check for --verify; the conversion itself is flux.py, its safetensors streaming streaming.py, the model check
# flux_verify.py. flux_verify imports flux (never this module); flux imports neither. flux_verify is imported
# only when --verify runs, so `python -m tools.convert_weights` and its other subcommands start without torch.
from tools.convert_weights import flux

SUBCOMMANDS = ("flux-fill", "flux-kontext", "flux-dev")


def convert_pipeline(variant: str, src: str, dst: str, dtype: str = "float32", transformer: str | None = None,
                     axes_dims_rope=None, verify: bool = False, tolerance: float = flux.VERIFY_TOLERANCE) -> None:
    """A diffusers Flux pipeline folder -> the folder `jax_inpaint_rl.models.flux.family.load` reads.

    A single original .safetensors file as `src` converts only the transformer (into dst/transformer).
    `verify`: the tensor check per component (`flux.convert_pipeline(check_tensors=True)`), then the model
    check (`flux_verify.check_models`) of every converted component, which raises `VerificationError` when
    a relative error exceeds `tolerance`."""
    components = flux.convert_pipeline(variant, src, dst, dtype, transformer, axes_dims_rope, check_tensors=verify)
    if verify:
        from tools.convert_weights import flux_verify  # torch, diffusers, transformers: only when checking

        flux_verify.check_models(components, dst, tolerance)


def add_arguments(parser) -> None:
    """Options of the flux-fill / flux-kontext / flux-dev subcommands."""
    parser.add_argument("--src", required=True, help="diffusers pipeline folder, or an original single-file "
                        "transformer (e.g. flux1-fill-dev.safetensors: converts the transformer only)")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--transformer", default=None, help="take the transformer from this diffusers folder or "
                        "original single file instead of SRC/transformer")
    parser.add_argument("--dtype", default="float32", choices=sorted(flux.OUTPUT_DTYPES), help="stored parameter dtype")
    parser.add_argument("--verify", action="store_true", help="re-read every source tensor and check the "
                        "written one equals it, then run torch and Flax on the same inputs per component (the "
                        "transformer and T5 block by block) and fail above --tolerance")
    parser.add_argument("--tolerance", type=float, default=flux.VERIFY_TOLERANCE, help="--verify fails when max "
                        "|diff| / max |torch output| of any output exceeds this (float32 compute)")


def run(args) -> None:
    """`args.command` is the subcommand: flux-fill, flux-kontext or flux-dev."""
    convert_pipeline(args.command, args.src, args.dst, args.dtype, args.transformer, verify=args.verify,
                     tolerance=args.tolerance)
    print(f"wrote {args.dst}")


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.convert_weights.flux_cli",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        add_arguments(sub.add_parser(name))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
