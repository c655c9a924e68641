"""Calligrapher checkpoints -> a folder the `calligrapher` family loads; its adapter -> ip-adapter.bin (export).

    python -m tools.convert_weights calligrapher --flux FLUX --siglip SIGLIP --adapter ADAPTER.bin --dst DST
        [--dtype float32|bfloat16|float16] [--no-qformer] [--ip-scale 1.0] [--qformer-heads 8] [--verify]

FLUX is a folder written by `python -m tools.convert_weights flux-fill` (its files are hard-linked, or copied
where links cannot be made), a diffusers FLUX.1-Fill-dev pipeline folder (converted here), or an earlier
converted Calligrapher folder (its Flux and, without --siglip, its image encoder are reused: the way to swap
in another adapter file). SIGLIP is a transformers folder of google/siglip-so400m-patch14-384: a SiglipModel
checkpoint (keys `vision_model.*`; its text tower, logit_scale and logit_bias are skipped, as
SiglipVisionModel.from_pretrained skips them) or a SiglipVisionModel one (transformers 5 writes its keys
without the `vision_model.` prefix): both read.

ADAPTER is a torch `.bin` in any of three layouts (every expected key must be there; what is missing or
unknown is named and nothing is written):
  released   calligrapher.bin: image_proj_mlp, image_proj_qformer, attn_adapter
  standard   the seeds' ip-adapter.bin: image_proj (the MLP's weights), ip_adapter; our export adds
             image_proj_qformer beside them for a Q-Former model (the seeds' loader ignores it)
  legacy     image_proj_mlp, attn_adapter (MLP only)
attn_adapter / ip_adapter hold `{i}.to_k_ip.weight` and `{i}.to_v_ip.weight` for every Flux attention layer,
i = 0 .. 18 the double blocks, 19 .. 56 the single blocks. With a Q-Former section the model sums MLP and
Q-Former (the release); `--no-qformer` drops it (the seeds' RL trainer trains the MLP alone; note that the
seeds' loader silently drops it when reading a released file).

Output folder (params/*.safetensors keys '<component>/<flax path>', as the Flux converter writes):
  params/transformer|vae|text_encoder|text_encoder_2.safetensors   Flux.1 Fill (see flux_cli.py)
  params/image_encoder.safetensors   SigLIP vision tower, layers stacked
  params/image_proj.safetensors      'image_proj/mlp/...', 'image_proj/qformer/...'
  params/ip_attention.safetensors    'ip_attention/double|single/to_k_ip|to_v_ip/kernel', stacked per block kind
  transformer/ vae/ text_encoder/ text_encoder_2/ image_encoder/ adapter/   config.json of each
  tokenizer/ tokenizer_2/ scheduler/, calligrapher.json {"family", "dtype", "source"}

`python -m tools.convert_weights export-calligrapher` writes the adapter back as `ip-adapter.bin` (standard
layout, which the seeds' inference and --initial_ip_adapter_path read) from a converted folder or a training
run's export/.
`--verify` re-reads every source tensor of the image encoder and the adapter and checks the written one equals
it (after the dtype cast), then runs the image encoder in torch and in Flax on the same seeded pixels.
"""
import os
import re
import shutil
from typing import Iterator, Mapping

import numpy as np

from jax_inpaint_rl.models.params_io import family_markers, read_json
from tools.convert_weights import common, flux
from tools.convert_weights.common import Rule, conv_to_flax, identity, linear_to_flax
from tools.convert_weights.streaming import DTYPES, read_rows

NAME = "calligrapher"
FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
FLUX_FOLDERS = FLUX_COMPONENTS + ("tokenizer", "tokenizer_2", "scheduler")
IMAGE_ENCODER = "image_encoder"
ADAPTER_FILES = ("image_proj", "ip_attention")

# --- SigLIP vision tower -----------------------------------------------------------------------------------

_SIGLIP = r"(?:vision_model\.)?"
_LAYER = rf"{_SIGLIP}encoder\.layers\.(\d+)"


def _layer_norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/scale"),
            Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias")]


SIGLIP_RULES: list[Rule] = [
    Rule(rf"{_SIGLIP}embeddings\.patch_embedding\.weight", "embeddings/patch_embedding/kernel", conv_to_flax),
    Rule(rf"{_SIGLIP}embeddings\.patch_embedding\.bias", "embeddings/patch_embedding/bias"),
    Rule(rf"{_SIGLIP}embeddings\.position_embedding\.weight", "embeddings/position_embedding/embedding"),
    *_layer_norm(rf"{_LAYER}\.(layer_norm[12])", r"layers/\1/\2"),
    *flux.linear(rf"{_LAYER}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"layers/\1/self_attn/\2"),
    *flux.linear(rf"{_LAYER}\.mlp\.(fc1|fc2)", r"layers/\1/mlp/\2"),
    *_layer_norm(rf"{_SIGLIP}post_layernorm", "post_layernorm"),
    Rule(rf"{_SIGLIP}head\.probe", "head/probe"),
    Rule(rf"{_SIGLIP}head\.attention\.in_proj_weight", "head/attention/in_proj/kernel", linear_to_flax),
    Rule(rf"{_SIGLIP}head\.attention\.in_proj_bias", "head/attention/in_proj/bias"),
    *flux.linear(rf"{_SIGLIP}head\.attention\.out_proj", "head/attention/out_proj"),
    *_layer_norm(rf"{_SIGLIP}head\.layernorm", "head/layernorm"),
    *flux.linear(rf"{_SIGLIP}head\.mlp\.(fc1|fc2)", r"head/mlp/\1"),
]
SIGLIP_STACKS = ("layers",)
SIGLIP_BUFFERS = rf"{_SIGLIP}embeddings\.position_ids"  # a buffer some checkpoints store: not a parameter
SIGLIP_OTHER_TOWER = r"text_model\..*|logit_scale|logit_bias"  # SiglipModel's text side (skipped)


def siglip_tensors(tensors: Iterator[tuple[str, np.ndarray]], full_model: bool):
    """Drop stored buffers, and the text tower when the checkpoint is a whole SiglipModel."""
    for key, value in tensors:
        if re.fullmatch(SIGLIP_BUFFERS, key) or (full_model and re.fullmatch(SIGLIP_OTHER_TOWER, key)):
            continue
        yield key, value


def siglip_component(src: str) -> flux.Component:
    """A transformers SigLIP folder (SiglipModel or SiglipVisionModel) -> its vision tower's Component."""
    import functools

    from jax_inpaint_rl.models.layers import siglip

    config = read_json(os.path.join(src, "config.json"))
    full_model = "vision_config" in config
    vision = dict(config["vision_config"] or {}) if full_model else dict(config)
    vision.setdefault("model_type", "siglip_vision_model")
    parsed = siglip.SiglipVisionConfig.from_transformers(vision, os.path.join(src, "config.json"))
    if not parsed.vision_use_head:
        raise common.ConversionError(f"{src}: vision_use_head is false; Calligrapher reads the pooled (head) output")
    shapes = flux.shapes_of(siglip.param_shapes(parsed))
    return flux.Component(src, vision, tuple(flux.safetensors_files(src, "SigLIP")), SIGLIP_RULES, shapes,
                          SIGLIP_STACKS, rename=functools.partial(siglip_tensors, full_model=full_model))


# --- the adapter .bin ---------------------------------------------------------------------------------------

IMAGE_PROJ_RULES: list[Rule] = [
    *flux.linear(r"image_proj_mlp\.proj\.(0|2)", r"mlp/proj_\1"),
    *_layer_norm(r"image_proj_mlp\.norm", "mlp/norm"),
    Rule(r"image_proj_qformer\.query_embeds", "qformer/query_embeds"),
    *flux.linear(r"image_proj_qformer\.id_proj\.(0|2)", r"qformer/id_proj_\1"),
    Rule(r"image_proj_qformer\.cross_attn\.in_proj_weight", "qformer/cross_attn/in_proj/kernel", linear_to_flax),
    Rule(r"image_proj_qformer\.cross_attn\.in_proj_bias", "qformer/cross_attn/in_proj/bias"),
    *flux.linear(r"image_proj_qformer\.cross_attn\.out_proj", "qformer/cross_attn/out_proj"),
    *_layer_norm(r"image_proj_qformer\.(cross_attn_norm|norm)", r"qformer/\1"),
]
IP_RULES: list[Rule] = [
    Rule(r"attn_adapter\.(double|single)\.(\d+)\.(to_k_ip|to_v_ip)\.weight", r"\1/\2/\3/kernel", linear_to_flax)]
IP_STACKS = ("double", "single")
# section name in each layout -> our canonical prefix (a key's section + '.' + its name in the section)
LAYOUTS = {
    "released": {"image_proj_mlp": "image_proj_mlp", "image_proj_qformer": "image_proj_qformer",
                 "attn_adapter": "attn_adapter"},
    "standard": {"image_proj": "image_proj_mlp", "image_proj_qformer": "image_proj_qformer",
                 "ip_adapter": "attn_adapter"},
    "legacy": {"image_proj_mlp": "image_proj_mlp", "attn_adapter": "attn_adapter"},
}
_SHAPE_OF = {identity: lambda s: tuple(s), linear_to_flax: lambda s: tuple(s)[::-1]}


def load_bin(path: str) -> dict:
    """A torch .bin state dict, memory-mapped where the file allows it (torch >= 2.1 zip files)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def detect_layout(path: str, state: Mapping) -> str:
    """Which of LAYOUTS a loaded adapter state dict is; a ConversionError naming its sections otherwise."""
    sections = sorted(state) if isinstance(state, Mapping) else []
    if "image_proj" in sections:
        layout = "standard"
    elif "image_proj_mlp" in sections:
        layout = "released" if "image_proj_qformer" in sections else "legacy"
    else:
        raise common.ConversionError(f"{path}: not a Calligrapher / IP-Adapter file: top-level sections {sections}; "
                                     "expected image_proj + ip_adapter (the seeds' ip-adapter.bin), image_proj_mlp + "
                                     "image_proj_qformer + attn_adapter (calligrapher.bin) or image_proj_mlp + "
                                     "attn_adapter (legacy)")
    expected = LAYOUTS[layout]
    problems = [f"section {s!r} is not part of the {layout} layout {sorted(expected)}" for s in sections
                if s not in expected]
    required = [s for s in expected if s != "image_proj_qformer"]
    problems += [f"section {s!r} missing (the {layout} layout needs {required})" for s in required
                 if s not in sections]
    problems += [f"section {s!r} is a {type(state[s]).__name__}, expected a state dict" for s in sections
                 if s in expected and not isinstance(state[s], Mapping)]
    if problems:
        raise common.ConversionError(f"{path}: " + "; ".join(problems))
    return layout


def canonical_tensors(path: str, state: Mapping, layout: str, num_double: int, keep_qformer: bool = True):
    """{canonical key: torch tensor}: sections renamed to the released names, attention layer i to
    'double.i' (i < num_double) or 'single.(i - num_double)'; the Q-Former left out unless keep_qformer."""
    out = {}
    for section, canonical in LAYOUTS[layout].items():
        if section not in state or (canonical == "image_proj_qformer" and not keep_qformer):
            continue
        for key, value in state[section].items():
            if canonical == "attn_adapter":
                index, _, rest = key.partition(".")
                if index.isdigit():
                    i = int(index)
                    key = f"double.{i}.{rest}" if i < num_double else f"single.{i - num_double}.{rest}"
            out[f"{canonical}.{key}"] = value
    return out


def original_attention_key(canonical: str, num_double: int) -> str:
    """'attn_adapter.single.3.to_k_ip.weight' -> 'attn_adapter.22.to_k_ip.weight' (error messages, export)."""
    m = re.fullmatch(r"attn_adapter\.(double|single)\.(\d+)\.(.*)", canonical)
    if not m:
        return canonical
    index = int(m[2]) + (num_double if m[1] == "single" else 0)
    return f"attn_adapter.{index}.{m[3]}"


def adapter_config_from(tensors: Mapping, joint_dim: int, use_qformer: bool, qformer_heads: int,
                        ip_scale: float, source: str) -> dict:
    """The adapter config the tensors imply: token counts and the embedding width read from their shapes."""
    def shape(key):
        if key not in tensors:
            raise common.ConversionError(f"{source}: missing {key} (the adapter's shapes are read from it)")
        return tuple(tensors[key].shape)

    embed_dim = shape("image_proj_mlp.proj.0.weight")[1]
    tokens = shape("image_proj_mlp.proj.2.weight")[0]
    if tokens % joint_dim:
        raise common.ConversionError(f"{source}: image_proj_mlp.proj.2.weight has {tokens} outputs, not a multiple of "
                                     f"the transformer's joint_attention_dim {joint_dim}")
    config = {"num_tokens": tokens // joint_dim, "image_embed_dim": embed_dim, "use_qformer": use_qformer,
              "qformer_heads": qformer_heads, "ip_scale": ip_scale}
    if use_qformer:
        kv = shape("image_proj_qformer.id_proj.2.weight")[0]
        if kv % joint_dim:
            raise common.ConversionError(f"{source}: image_proj_qformer.id_proj.2.weight has {kv} outputs, not a "
                                         f"multiple of {joint_dim}")
        config["qformer_query_tokens"] = kv // joint_dim
    return config


def check_adapter(source: str, tensors: Mapping, expected: Mapping[str, Mapping[str, tuple]], num_double: int):
    """Every key of every adapter file matched, present and of the right shape: one ConversionError listing all
    problems (keys as the file names them), before anything is written."""
    tables = {"image_proj": IMAGE_PROJ_RULES, "ip_attention": IP_RULES}
    per_layer = {name: flux.per_layer_shapes(expected[name], IP_STACKS if name == "ip_attention" else ())
                 for name in tables}
    unknown, misshaped, produced = [], [], {name: set() for name in tables}
    for key, value in tensors.items():
        hit = next(((name, path, rule) for name, rules in tables.items()
                    for path, rule in [common._match(rules, key) or (None, None)] if path is not None), None)
        shown = original_attention_key(key, num_double)
        if hit is None or hit[1] not in per_layer[hit[0]]:
            unknown.append(shown)
            continue
        name, path, rule = hit
        produced[name].add(path)
        got = _SHAPE_OF[rule.transform](value.shape)
        if got != tuple(per_layer[name][path]):
            want = _SHAPE_OF[rule.transform](per_layer[name][path])  # in the file's (torch) layout
            misshaped.append(f"{shown}: shape {tuple(value.shape)}, expected {want}")
    missing = []
    for name in tables:
        for path in sorted(set(per_layer[name]) - produced[name]):
            missing.append(f"{name}/{path}")
    if unknown or missing or misshaped:
        raise common.ConversionError(common._format_problems(source, sorted(unknown), missing, misshaped, []))


def _numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy (bfloat16 through float32, exactly)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def write_adapter(source: str, config: dict, tensors: Mapping, expected: Mapping, dst: str, dtype) -> None:
    """params/image_proj.safetensors and params/ip_attention.safetensors, streamed tensor by tensor, and
    adapter/config.json."""
    for name, rules, stacks in (("image_proj", IMAGE_PROJ_RULES, ()), ("ip_attention", IP_RULES, IP_STACKS)):
        matched = ((k, _numpy(v)) for k, v in tensors.items() if common._match(rules, k))
        flux.write_params(source, matched, rules, expected[name], stacks, flux.params_file(dst, name), dtype,
                          {"source": source}, prefix=f"{name}/")
    flux.write_json(os.path.join(dst, "adapter", "config.json"), config)


def adapter_expected_shapes(transformer_config: dict, adapter_config: dict) -> dict:
    from jax_inpaint_rl.models.calligrapher import adapter as adapter_lib
    from jax_inpaint_rl.models.flux.transformer import FluxConfig

    shapes = adapter_lib.param_shapes(FluxConfig.from_diffusers(transformer_config),
                                      adapter_lib.AdapterConfig.from_dict(adapter_config))
    return {name: flux.shapes_of(shapes[name]) for name in ADAPTER_FILES}


def read_adapter(path: str, transformer_config: dict, no_qformer: bool = False, qformer_heads: int = 8,
                 ip_scale: float = 1.0):
    """Load and check an adapter .bin (any layout) against the transformer: (config, tensors, expected shapes),
    or one ConversionError naming every problem. Nothing is written."""
    state = load_bin(path)
    layout = detect_layout(path, state)
    num_double = transformer_config["num_layers"]
    use_qformer = "image_proj_qformer" in state and not no_qformer
    tensors = canonical_tensors(path, state, layout, num_double, keep_qformer=use_qformer)
    config = adapter_config_from(tensors, transformer_config["joint_attention_dim"], use_qformer, qformer_heads,
                                 ip_scale, path)
    expected = adapter_expected_shapes(transformer_config, config)
    check_adapter(path, tensors, expected, num_double)
    if "image_proj_qformer" in state and no_qformer:
        print(f"{path}: image_proj_qformer left out (--no-qformer): the MLP projection alone")
    return {**config, "_layout": layout, "_source": os.path.abspath(path)}, tensors, expected


def convert_adapter(path: str, dst: str, transformer_config: dict, dtype: str = "float32",
                    no_qformer: bool = False, qformer_heads: int = 8, ip_scale: float = 1.0) -> dict:
    """An adapter .bin (any layout) -> dst/params/image_proj|ip_attention.safetensors and dst/adapter/config.json.
    Returns the adapter config written."""
    config, tensors, expected = read_adapter(path, transformer_config, no_qformer, qformer_heads, ip_scale)
    write_adapter(path, config, tensors, expected, dst, flux.OUTPUT_DTYPES[dtype])
    return config


# --- the whole folder ---------------------------------------------------------------------------------------

def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def flux_kind(src: str) -> str:
    """'converted' (flux-fill output), 'calligrapher' (an earlier output of this converter) or 'diffusers'."""
    if os.path.isfile(flux.params_file(src, "transformer")):
        markers = family_markers(src)
        if NAME in markers:
            return NAME
        if markers and "flux_fill" not in markers:
            raise ValueError(f"{src}: a converted folder of {sorted(markers)}; Calligrapher needs flux_fill")
        return "converted"
    if os.path.isfile(os.path.join(src, "model_index.json")):
        return "diffusers"
    raise FileNotFoundError(f"{src}: neither a converted Flux Fill folder (params/transformer.safetensors) nor a "
                            "diffusers pipeline folder (model_index.json)")


def reuse_components(src: str, dst: str, components: tuple[str, ...], folders: tuple[str, ...]) -> None:
    """Hard-link (or copy) converted params files and copy their config / tokenizer folders."""
    for name in components:
        _link_or_copy(flux.params_file(src, name), flux.params_file(dst, name))
    for folder in folders:
        if not os.path.isdir(os.path.join(src, folder)):
            raise FileNotFoundError(f"{src}: converted folder has no {folder}/")
        shutil.copytree(os.path.join(src, folder), os.path.join(dst, folder), dirs_exist_ok=True)


def convert(flux_src: str, adapter: str, dst: str, siglip_src: str | None = None, dtype: str = "float32",
            no_qformer: bool = False, qformer_heads: int = 8, ip_scale: float = 1.0, verify: bool = False) -> None:
    """FLUX (+ SIGLIP) + ADAPTER -> the folder `jax_inpaint_rl.models.calligrapher.family.load` reads. The adapter
    and the image encoder are checked against the Flux config before anything is written."""
    if dtype not in flux.OUTPUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(flux.OUTPUT_DTYPES)}")
    kind = flux_kind(flux_src)
    if siglip_src is None and kind != NAME:
        raise ValueError("--siglip is required unless --flux is a converted Calligrapher folder")
    transformer_config = read_json(os.path.join(flux_src, "transformer", "config.json"))
    config, tensors, expected = read_adapter(adapter, transformer_config, no_qformer, qformer_heads, ip_scale)
    from jax_inpaint_rl.models.layers import siglip

    encoder = siglip_component(siglip_src) if siglip_src else None
    encoder_config = encoder.config if encoder else read_json(os.path.join(flux_src, IMAGE_ENCODER, "config.json"))
    hidden = siglip.SiglipVisionConfig.from_transformers(encoder_config).hidden_size
    if hidden != config["image_embed_dim"]:
        raise common.ConversionError(f"{adapter}: the projection reads {config['image_embed_dim']}-wide embeddings; "
                                     f"the image encoder's pooled output is {hidden} wide")
    os.makedirs(dst, exist_ok=True)
    if kind == "diffusers":
        flux.convert_pipeline("flux-fill", flux_src, dst, dtype, check_tensors=verify)
        os.remove(os.path.join(dst, "flux_fill.json"))  # this folder is a Calligrapher folder, not a Fill one
    else:
        reuse_components(flux_src, dst, FLUX_COMPONENTS, FLUX_FOLDERS)
    if encoder is None:
        reuse_components(flux_src, dst, (IMAGE_ENCODER,), (IMAGE_ENCODER,))
    else:
        flux.convert_component(encoder, dst, IMAGE_ENCODER, dtype)
        if verify:
            print(f"verified {IMAGE_ENCODER}: {flux.verify_component(encoder, dst, IMAGE_ENCODER)} tensors equal "
                  "their source")
    write_adapter(adapter, config, tensors, expected, dst, flux.OUTPUT_DTYPES[dtype])
    if verify:
        print(f"verified adapter: {verify_adapter(adapter, dst, transformer_config, config)} tensors equal their "
              "source")
    flux.write_json(os.path.join(dst, f"{NAME}.json"), {
        "family": NAME, "dtype": dtype, "source": {"flux": os.path.abspath(flux_src), "adapter": os.path.abspath(
            adapter), "image_encoder": os.path.abspath(siglip_src or flux_src)}})
    from jax_inpaint_rl.models.calligrapher import family as calligrapher

    calligrapher.folder_family(dst)  # raises unless the components fit together
    if verify and siglip_src is not None:
        error = verify_image_encoder(siglip_src, dst)
        print(f"image encoder, torch vs flax: relative error {error:.2e} (pooled output)")
        if error > flux.VERIFY_TOLERANCE:
            raise common.ConversionError(f"{dst}: image encoder differs from {siglip_src}: relative error {error:.2e}"
                                         f" > {flux.VERIFY_TOLERANCE}")


def verify_adapter(adapter: str, dst: str, transformer_config: dict, written: dict) -> int:
    """Every adapter tensor re-read from the .bin equals its written slot (after the dtype cast)."""
    state = load_bin(adapter)
    layout = detect_layout(adapter, state)
    tensors = canonical_tensors(adapter, state, layout, transformer_config["num_layers"], written["use_qformer"])
    count, mismatched = 0, []
    for name, rules, stacks in (("image_proj", IMAGE_PROJ_RULES, ()), ("ip_attention", IP_RULES, IP_STACKS)):
        read, _ = read_rows(flux.params_file(dst, name))
        for key, value in tensors.items():
            hit = common._match(rules, key)
            if hit is None:
                continue
            path, rule = hit
            leaf, index = flux.split_layer(path, stacks)
            stored = read(f"{name}/{leaf}", index)
            if not np.array_equal(rule.transform(_numpy(value)).astype(stored.dtype), stored):
                mismatched.append(key)
            count += 1
    if mismatched:
        raise common.ConversionError(f"{dst}: adapter tensors differ from {adapter}: {mismatched}")
    return count


def verify_image_encoder(siglip_src: str, dst: str, seed: int = 0) -> float:
    """max |flax - torch| / max |torch| of the pooled output on seeded pixels, float32."""
    import jax.numpy as jnp
    import torch
    from transformers import SiglipVisionModel

    from jax_inpaint_rl.models.layers import siglip
    from jax_inpaint_rl.models.params_io import load_params

    model = SiglipVisionModel.from_pretrained(siglip_src, torch_dtype=torch.float32).eval()
    config = siglip.SiglipVisionConfig.from_transformers(read_json(os.path.join(dst, IMAGE_ENCODER, "config.json")))
    pixels = np.random.default_rng(seed).uniform(-1, 1, (1, config.image_size, config.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
    params = load_params(flux.params_file(dst, IMAGE_ENCODER))[IMAGE_ENCODER]
    got = np.asarray(siglip.encode(siglip.SiglipVision(config), _float32(params), jnp.asarray(pixels)))
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _float32(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


# --- export: the adapter back to a torch .bin ------------------------------------------------------------------

EXPORT_LAYOUTS = ("standard", "released", "legacy")
MLP_KEYS = tuple(f"image_proj_mlp.{k}" for k in ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                                 "norm.weight", "norm.bias"))
QFORMER_KEYS = tuple(f"image_proj_qformer.{k}" for k in (
    "query_embeds", "id_proj.0.weight", "id_proj.0.bias", "id_proj.2.weight", "id_proj.2.bias",
    "cross_attn.in_proj_weight", "cross_attn.in_proj_bias", "cross_attn.out_proj.weight", "cross_attn.out_proj.bias",
    "cross_attn_norm.weight", "cross_attn_norm.bias", "norm.weight", "norm.bias"))


def adapter_leaves(src: str, use_ema: bool = False):
    """({'image_proj/...' | 'ip_attention/...': (shape, dtype)}, read(key) -> array) of a converted Calligrapher
    folder or of a training run's export/ (the orbax denoiser, or its EMA; the adapter leaves alone are read)."""
    from tools.convert_weights import flux_export

    if all(os.path.isfile(flux.params_file(src, name)) for name in ADAPTER_FILES):
        if use_ema:
            raise ValueError(f"{src}: --use-ema needs a training export (denoiser_ema/); a converted folder holds "
                             "one adapter")
        leaves, readers = {}, {}
        for name in ADAPTER_FILES:
            read, header = read_rows(flux.params_file(src, name))
            for key, entry in header.items():
                leaves[key] = (tuple(entry["shape"]), np.dtype(DTYPES[entry["dtype"]]))
                readers[key] = read
        return leaves, lambda key: readers[key](key, None)
    if flux_export.is_training_export(src):
        config = read_json(os.path.join(src, flux_export.EXPORT_CONFIG)).get("model", {})
        if config.get("family") != NAME:
            raise ValueError(f"{src}/{flux_export.EXPORT_CONFIG}: model.family={config.get('family')!r}; "
                             f"export-calligrapher needs {NAME!r}")
        tree_path = os.path.join(os.path.abspath(src), "denoiser_ema" if use_ema else "denoiser")
        if not os.path.isdir(tree_path):
            raise FileNotFoundError(f"{tree_path}: missing (the run had ema.enabled=False); export without --use-ema")
        leaves, read = flux_export.orbax_leaves(tree_path)
        chosen = {k: v for k, v in leaves.items() if k.split("/", 1)[0] in ADAPTER_FILES}
        return chosen, lambda key: read(key, None)
    raise FileNotFoundError(f"{src}: neither a converted Calligrapher folder (params/image_proj.safetensors, "
                            f"params/ip_attention.safetensors) nor a training export ({flux_export.EXPORT_CONFIG} + "
                            "denoiser/)")


def adapter_state_dict(leaves: Mapping, read, layout: str = "standard", dtype: str | None = None,
                       source: str = "adapter") -> dict:
    """Flax adapter leaves -> {section: {torch key: torch tensor}} in `layout` (see the module docstring)."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {EXPORT_LAYOUTS}")
    stacked = {k: shape for k, (shape, _) in leaves.items()}
    has_qformer = any(k.startswith("image_proj/qformer/") for k in stacked)
    if layout == "released" and not has_qformer:
        raise ValueError(f"{source}: an MLP-only adapter has no image_proj_qformer, which the released layout (and "
                         "the release's strict loader) needs; export --layout standard")
    if layout == "legacy" and has_qformer:
        raise ValueError(f"{source}: the legacy layout has no place for the Q-Former projection; export --layout "
                         "standard (which keeps it as image_proj_qformer) or released")
    try:
        num_double = stacked["ip_attention/double/to_k_ip/kernel"][0]
        num_single = stacked["ip_attention/single/to_k_ip/kernel"][0]
    except KeyError as missing:
        raise common.ConversionError(f"{source}: no {missing} leaf; not a Calligrapher adapter") from None
    flat = {}
    for key in stacked:
        name, _, path = key.partition("/")
        array = np.asarray(read(key))
        leaf, _, rest = path.partition("/")
        if name == "ip_attention":
            flat.update({f"{name}/{leaf}/{i}/{rest}": array[i] for i in range(array.shape[0])})
        else:
            flat[key] = array
    canonical = {}
    image_keys = MLP_KEYS + (QFORMER_KEYS if has_qformer else ())
    ip_keys = tuple(f"attn_adapter.{kind}.{i}.{proj}.weight" for kind, count in (("double", num_double),
                                                                                 ("single", num_single))
                    for i in range(count) for proj in ("to_k_ip", "to_v_ip"))
    for name, rules, keys in (("image_proj", IMAGE_PROJ_RULES, image_keys), ("ip_attention", IP_RULES, ip_keys)):
        prefix = f"{name}/"
        part = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        canonical.update(common.export(part, rules, keys))
        extra = sorted(set(part) - {common._match(rules, k)[0] for k in keys})
        if extra:
            raise common.ConversionError(f"{source}: adapter leaves the export has no key for: {extra}")
    sections = {v: k for k, v in LAYOUTS[layout].items()}  # canonical prefix -> section in this layout
    sections.setdefault("image_proj_qformer", "image_proj_qformer")
    out: dict[str, dict] = {}
    for key, array in canonical.items():
        key = original_attention_key(key, num_double)
        prefix, _, rest = key.partition(".")
        out.setdefault(sections[prefix], {})[rest] = _torch(array, dtype)
    return out


def _torch(array: np.ndarray, dtype: str | None):
    import ml_dtypes
    import torch

    target = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    is_bf16 = array.dtype == ml_dtypes.bfloat16
    tensor = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32) if is_bf16 else array))
    if target is None:
        target = torch.bfloat16 if is_bf16 else tensor.dtype
    return tensor.to(target)


def export_adapter(src: str, dst: str, use_ema: bool = False, layout: str = "standard",
                   dtype: str | None = None) -> str:
    """Write the adapter of `src` (converted folder or training export) as a torch .bin; returns its path
    (`dst` itself when it ends in .bin, else dst/ip-adapter.bin)."""
    import torch

    leaves, read = adapter_leaves(src, use_ema)
    state = adapter_state_dict(leaves, read, layout, dtype, src)
    path = dst if dst.endswith(".bin") else os.path.join(dst, "ip-adapter.bin")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)
    return path


# --- the command lines (two subcommands share this module: calligrapher, export-calligrapher) ----------------

EXPORT_COMMAND = "export-calligrapher"


def add_arguments(parser) -> None:
    if parser.prog.endswith(EXPORT_COMMAND):
        parser.description = EXPORT_HELP
        parser.add_argument("--src", required=True, help="converted Calligrapher folder, or a training run's export/")
        parser.add_argument("--dst", required=True, help="output .bin file, or a folder (gets ip-adapter.bin)")
        parser.add_argument("--use-ema", action="store_true", help="export the EMA weights (denoiser_ema/)")
        parser.add_argument("--layout", default="standard", choices=EXPORT_LAYOUTS,
                            help="standard: image_proj + ip_adapter (+ image_proj_qformer), what the seeds load; "
                            "released: image_proj_mlp + image_proj_qformer + attn_adapter (calligrapher.bin)")
        parser.add_argument("--dtype", default=None, choices=sorted(flux.OUTPUT_DTYPES),
                            help="tensor dtype (default: the stored one)")
        return
    parser.add_argument("--flux", required=True, help="converted flux-fill folder, diffusers FLUX.1-Fill-dev folder, "
                        "or an earlier converted Calligrapher folder")
    parser.add_argument("--siglip", default=None, help="transformers SigLIP folder (siglip-so400m-patch14-384); "
                        "optional when --flux is a converted Calligrapher folder")
    parser.add_argument("--adapter", required=True, help="calligrapher.bin or ip-adapter.bin (any of the three "
                        "layouts)")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(flux.OUTPUT_DTYPES),
                        help="stored dtype of what is converted here (reused Flux files keep theirs)")
    parser.add_argument("--no-qformer", action="store_true", help="leave the Q-Former projection out (the seeds' "
                        "MLP-only adapter)")
    parser.add_argument("--qformer-heads", type=int, default=8, help="heads of the Q-Former's attention (not "
                        "stored in the file; the release uses 8)")
    parser.add_argument("--ip-scale", type=float, default=1.0, help="weight of the image-prompt attention")
    parser.add_argument("--verify", action="store_true", help="re-read every converted tensor and compare, then "
                        "run the image encoder in torch and in Flax")


EXPORT_HELP = """The adapter of a converted Calligrapher folder or a training run's export -> ip-adapter.bin.

    python -m tools.convert_weights export-calligrapher --src SRC --dst DST [--use-ema] [--layout standard|released]
        [--dtype float32|bfloat16|float16]

SRC: a folder written by `calligrapher`, or <output_dir>/export of a run of the calligrapher family (the adapter
leaves of its orbax denoiser, or denoiser_ema with --use-ema, are read one at a time; the 12B transformer is not).
The standard layout is the seeds' (image_proj: the MLP, ip_adapter: {i}.to_k_ip / to_v_ip, i = 0..56), with
image_proj_qformer beside them for a Q-Former model; `calligrapher --adapter` reads it back bit-exactly.
"""


def run(args) -> None:
    if args.command == EXPORT_COMMAND:
        path = export_adapter(args.src, args.dst, args.use_ema, args.layout, args.dtype)
        print(f"wrote {path}" + (" (EMA weights)" if args.use_ema else ""))
        return
    convert(args.flux, args.adapter, args.dst, args.siglip, args.dtype, args.no_qformer, args.qformer_heads,
            args.ip_scale, args.verify)
    print(f"wrote {args.dst}")
