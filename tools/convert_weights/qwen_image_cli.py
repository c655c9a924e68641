"""Qwen-Image / Qwen-Image-Edit (a diffusers pipeline folder) -> a folder of Flax params the Qwen-Image families read.

    python -m tools.convert_weights qwen-image-edit --src SRC --dst DST [--dtype float32|bfloat16|float16] [--lm-head]
        [--verify] [--tolerance 1e-4]

SRC is a diffusers pipeline folder: transformer/ (QwenImageTransformer2DModel), vae/ (AutoencoderKLQwenImage),
text_encoder/ (Qwen2_5_VLForConditionalGeneration, in either key layout: `model.layers.*` + `visual.*`, or
`model.language_model.*` + `model.visual.*`; its lm_head only with --lm-head: the VLM policy needs logits, the
families read hidden states),
tokenizer/, scheduler/, and for the edit pipelines processor/ (the image processor's preprocessor_config.json).
Qwen-Image (text to image) folders serve `qwen_image_inpaint`; Qwen-Image-Edit / Edit-2509 / Edit-2511 folders
serve every variant (`model.family`: qwen_image_edit, qwen_image_edit_plus, qwen_image_edit_inpaint,
qwen_image_inpaint). `qwen-image` is the same command.

Output (qwen_image.py): params/<component>.safetensors (keys '<component>/<flax path>', blocks stacked),
<component>/config.json, tokenizer/, processor/, scheduler/, qwen_image.json. Each tensor is streamed: neither
the 20B transformer nor the 8B encoder is ever whole in memory. `--verify` re-reads every source tensor and
checks the written one equals it (after the dtype cast), then runs torch and Flax on the same seeded inputs
(qwen_image_verify.py): the transformer piece by piece (embedders, each block, output), the VAE whole, the text
encoder piece by piece (patch embed, each vision block, merger; embedding, each decoder layer, final norm). It
fails when a relative error exceeds --tolerance (1e-4). `python -m tools.convert_weights export-qwen-image`
writes a trained transformer back to diffusers.
"""
# The docstring above is the subcommand's --help; the conversion is qwen_image.py, the model check
# qwen_image_verify.py, imported only for --verify (torch).
from tools.convert_weights import flux, qwen_image


def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True, help="diffusers Qwen-Image or Qwen-Image-Edit pipeline folder")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(flux.OUTPUT_DTYPES), help="stored parameter dtype")
    parser.add_argument("--lm-head", action="store_true", help="also convert the VLM's lm_head (the VLM policy, "
                        "policy_kind='vlm', needs its logits; the Qwen-Image families do not)")
    parser.add_argument("--verify", action="store_true", help="re-read every source tensor and check the written "
                        "one equals it, then run torch and Flax on the same inputs (piece by piece) and fail above "
                        "--tolerance")
    parser.add_argument("--tolerance", type=float, default=flux.VERIFY_TOLERANCE, help="--verify fails when max "
                        "|diff| / max |torch output| of any output exceeds this (float32 compute)")


def run(args) -> None:
    components = qwen_image.convert_pipeline(args.src, args.dst, args.dtype, check_tensors=args.verify,
                                             lm_head=args.lm_head)
    if args.verify:
        from tools.convert_weights import qwen_image_verify  # torch, diffusers, transformers: only when checking

        qwen_image_verify.check_models(components, args.dst, args.tolerance)
    print(f"wrote {args.dst}")
