"""A converted Qwen-Image folder or a training run's export -> a diffusers transformer folder
(QwenImageTransformer2DModel).

    python -m tools.convert_weights export-qwen-image --src SRC --dst DST [--use-ema]
        [--dtype float32|bfloat16|float16]

SRC is either a folder written by `qwen-image-edit` (params/transformer.safetensors, transformer/config.json) or
a training run's <output_dir>/export (orbax trees denoiser/, denoiser_ema/ with --use-ema, and the run's
config.json, whose model.path names the converted folder the run started from). DST gets config.json and
diffusion_pytorch_model.safetensors: `QwenImageTransformer2DModel.from_pretrained(DST)` loads it; put it in
place of a pipeline folder's transformer/. The dtype is the stored one unless --dtype is given; float32 round
trips are exact. Memory: one layer of one tensor at a time from a converted file, one stacked leaf at a time
from an orbax tree (the largest, the MLPs' 60 x 3072 x 12288, is 9.1 GB in float32).
"""
from tools.convert_weights import flux_export, qwen_image

QWEN_IMAGE = flux_export.Exporter("Qwen-Image", "export-qwen-image", ("qwen_image_edit", "qwen_image_edit_plus",
                                                                      "qwen_image_edit_inpaint", "qwen_image_inpaint"),
                                  qwen_image.write_diffusers_transformer)


def add_arguments(parser) -> None:
    flux_export.add_arguments(parser, QWEN_IMAGE.what)


def run(args) -> None:
    flux_export.run(args, QWEN_IMAGE)
