"""Qwen2.5-VL vision tower and image processor: fp32 parity with transformers'
Qwen2_5_VisionTransformerPretrainedModel on tiny configs that differ in every knob (depth, heads, window
size, full-attention blocks incl. none, merge size 1 to 3, temporal patch 1 to 3, patch size, input channels,
output width, activation, RoPE theta), one and two images of non-square grids whose windows do not divide
evenly, a two-frame grid; the sequence layout against transformers' own helpers; the processor against
transformers' PIL-backend Qwen2VLImageProcessor, bitwise (resizing up, down, not at all; non-square; do_* flags);
processor -> tower end to end; the converter (stacked blocks, tensor check, whole-model prefixes, every bad
key named); bad configs and inputs; the full-size parameter count."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jax_inpaint_rl.models.params_io import load_params
from jax_inpaint_rl.models.qwen_vl import processor as qp
from jax_inpaint_rl.models.qwen_vl import vision as qv
from tests.sd15_fixtures import randomize_norms, relative_error, run_compiled, state_dict_numpy
from tools.convert_weights import common, qwen_vl_vision

CONFIGS = {  # name -> (transformers Qwen2_5_VLVisionConfig arguments, {"one" / "two": grids})
    # windows of 2 x 2 merge groups over 3 x 5 (uneven: edge windows hold 2 or 1 groups), then 2 x 2 (even)
    "silu_window": (dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=40, in_channels=3, patch_size=4,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                         out_hidden_size=24, hidden_act="silu"),
                    {"one": ((1, 6, 10),), "two": ((1, 6, 10), (1, 4, 4))}),
    # no full-attention block; 3 x 3 merge groups; windows of 3 x 3 groups over 3 x 4 and 2 x 1; 4 channels,
    # one frame per patch; RoPE theta 500
    "tanh_merge3": (dict(depth=2, hidden_size=48, num_heads=4, intermediate_size=64, in_channels=4, patch_size=2,
                         spatial_merge_size=3, temporal_patch_size=1, window_size=18, fullatt_block_indexes=[],
                         out_hidden_size=16, hidden_act="gelu_pytorch_tanh",
                         rope_parameters={"rope_theta": 500.0, "rope_type": "axial"}),
                    {"one": ((1, 9, 12),), "two": ((1, 9, 12), (1, 6, 3))}),
    # no merging (merge size 1), one head, first and last blocks full; a two-frame grid (video-like)
    "quick_gelu_frames": (dict(depth=4, hidden_size=16, num_heads=1, intermediate_size=24, in_channels=2,
                               patch_size=3, spatial_merge_size=1, temporal_patch_size=3, window_size=6,
                               fullatt_block_indexes=[0, 3], out_hidden_size=20, hidden_act="quick_gelu"),
                          {"one": ((1, 5, 3),), "two": ((2, 3, 4), (1, 5, 3))}),
}
TOLERANCE = 1e-4
# Qwen2.5-VL-7B's vision tower (Qwen-Image-Edit's text encoder), counted by transformers on the meta device
FULL = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=3584, hidden_act="silu")
FULL_PARAMETERS = 676_550_144

PROCESSORS = {  # name -> (Qwen2VLImageProcessorPil arguments, (H, W) image sizes)
    # factor 8, area in [256, 1280]: 13 x 37 rounds to 16 x 40; 5 x 9 grows; 60 x 100 and 90 x 7 shrink;
    # 16 x 24 is kept
    "bicubic": (dict(min_pixels=256, max_pixels=1280, patch_size=4, merge_size=2, temporal_patch_size=2),
                [(13, 37), (5, 9), (60, 100), (16, 24), (90, 7)]),
    # factor 6, bilinear, other mean / std, one frame per patch
    "bilinear": (dict(min_pixels=100, max_pixels=600, patch_size=2, merge_size=3, temporal_patch_size=1, resample=2,
                      image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]),
                 [(13, 37), (5, 9), (60, 100), (18, 24), (7, 90)]),
    # no resizing (sides already multiples of 4), no normalisation, three frames per patch
    "unresized": (dict(do_resize=False, do_normalize=False, patch_size=4, merge_size=1, temporal_patch_size=3),
                  [(8, 12), (20, 4)]),
}


def torch_tower(config: dict, seed: int = 0):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**config)).eval()
    with torch.no_grad():  # transformers' init (std 0.02) leaves attention nearly uniform: widen it
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, param[0].numel() ** -0.5)
    return randomize_norms(model)


def torch_forward(model, patches: np.ndarray, grids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(patches), torch.tensor(grids)).pooler_output.numpy()


def flax_forward(config: qv.VisionConfig, params, patches: np.ndarray, grids, remat: bool = False) -> np.ndarray:
    model = qv.VisionTransformer(config, remat=remat)
    return np.asarray(run_compiled(lambda p, x: model.apply({"params": p}, x, grids), params, jnp.asarray(patches)))


def random_patches(config: qv.VisionConfig, grids, seed: int = 1) -> np.ndarray:
    tokens = sum(int(np.prod(grid)) for grid in grids)
    return np.random.default_rng(seed).standard_normal((tokens, config.patch_dim), np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """(name, torch model, our config, converted params, transformers folder, converted folder, component)."""
    folder = tmp_path_factory.mktemp(f"qwen_vl_vision_{request.param}")
    model = torch_tower(CONFIGS[request.param][0])
    model.save_pretrained(folder / "src")
    component = qwen_vl_vision.convert_vision(str(folder / "src"), str(folder / "out"))
    config = qv.VisionConfig.from_transformers(json.loads((folder / "src" / "config.json").read_text()))
    params = load_params(folder / "out" / "params")["visual"]
    return request.param, model, config, params, folder / "src", folder / "out", component


@pytest.mark.parametrize("images", ["one", "two"])
def test_parity_with_transformers(converted, images):
    name, model, config, params, _, _, _ = converted
    grids = CONFIGS[name][1][images]
    patches = random_patches(config, grids)
    ref = torch_forward(model, patches, grids)
    got = flax_forward(config, params, patches, grids)
    assert got.shape == ref.shape == (len(patches) // config.merge_unit, config.out_hidden_size)
    error = relative_error(got, ref)
    print(f"{name} {images} {grids}: max relative error {error:.2e}")
    assert error <= TOLERANCE, (name, grids, error)


def test_parity_needs_each_blocks_mask(converted):
    """The masks the parity exercises change the output: swapping every block's window / full choice moves it
    far from transformers'."""
    name, model, config, params, _, _, _ = converted
    grids = CONFIGS[name][1]["two"]
    patches = random_patches(config, grids)
    ref = torch_forward(model, patches, grids)
    swapped = tuple(i for i in range(config.depth) if i not in config.fullatt_block_indexes)
    changed = dataclasses.replace(config, fullatt_block_indexes=swapped)
    assert relative_error(flax_forward(changed, params, patches, grids), ref) > 1e-3


def test_layout_follows_transformers():
    """Window order, window and frame segments and RoPE positions equal transformers' vision_utils helpers,
    and the grids reach the padded-window path (edge windows smaller than a full one)."""
    from transformers import vision_utils

    for name, (arguments, grid_sets) in CONFIGS.items():
        config = qv.VisionConfig.from_transformers(arguments)
        for grids in grid_sets.values():
            grid = torch.tensor(grids)
            seq = qv.layout(config, grids)
            window_index, cu_windows = vision_utils.get_vision_window_index(
                grid, config.spatial_merge_size, config.window_size, config.patch_size)
            np.testing.assert_array_equal(seq.merge_order, window_index.numpy(), err_msg=name)
            np.testing.assert_array_equal(boundaries(seq.windows), cu_windows.numpy(), err_msg=name)
            np.testing.assert_array_equal(boundaries(seq.frames), vision_utils.get_vision_cu_seqlens(grid).numpy())
            positions = vision_utils.get_vision_position_ids(grid, config.spatial_merge_size).numpy()
            positions = positions.reshape(-1, config.merge_unit, 2)[window_index.numpy()].reshape(-1, 2)
            np.testing.assert_array_equal(seq.positions, positions, err_msg=name)
            window_sizes = np.diff(boundaries(seq.windows))
            assert window_sizes.min() < (config.window_merges ** 2 * config.merge_unit), (name, grids)


def boundaries(segments: np.ndarray) -> np.ndarray:
    """Segment ids (runs) -> cumulative boundaries [0, ..., N], as transformers' cu_seqlens."""
    return np.concatenate([[0], np.flatnonzero(np.diff(segments)) + 1, [len(segments)]])


def test_converter_stacks_blocks_and_tensor_check(converted):
    _, model, config, params, _, out, component = converted
    assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (config.depth, config.hidden_size,
                                                               3 * config.hidden_size)
    last = model.blocks[config.depth - 1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(params["blocks"]["mlp"]["down_proj"]["kernel"][config.depth - 1], last.T)
    conv = model.patch_embed.proj.weight.detach().numpy()  # (out, C, T, p, p)
    np.testing.assert_array_equal(params["patch_embed"]["kernel"], conv.reshape(len(conv), -1).T)
    assert qwen_vl_vision.verify_vision(component, str(out)) == len(model.state_dict())
    assert json.loads((out / "visual" / "config.json").read_text())["depth"] == config.depth


def write_checkpoint(folder, state: dict, config: dict) -> str:
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_whole_model_checkpoint_prefixes(tmp_path):
    """A Qwen2.5-VL folder: the tower under 'model.visual.' (transformers 5) or 'visual.' (released
    checkpoints), next to language-model tensors the tower's converter leaves alone; the wrong prefix names
    every missing or unknown key."""
    arguments = CONFIGS["silu_window"][0]
    model = torch_tower(arguments)
    state = state_dict_numpy(model)
    config = {"model_type": "qwen2_5_vl", "vision_config": dict(arguments, in_chans=3, spatial_patch_size=4,
                                                                  tokens_per_second=2, torch_dtype="float32")}
    other = {"model.language_model.embed_tokens.weight": np.zeros((4, 2), np.float32),
             "lm_head.weight": np.zeros((4, 2), np.float32)}
    for prefix in ("model.visual.", "visual."):
        src = write_checkpoint(tmp_path / prefix.replace(".", "_"),
                               {**{prefix + k: v for k, v in state.items()}, **other}, config)
        qwen_vl_vision.convert_vision(src, str(tmp_path / prefix / "out"), prefix=prefix)
        params = load_params(tmp_path / prefix / "out" / "params")["visual"]
        np.testing.assert_array_equal(params["merger"]["mlp_2"]["kernel"], state["merger.mlp.2.weight"].T)
        wrong = "" if prefix == "visual." else "visual."
        with pytest.raises(common.ConversionError) as err:
            qwen_vl_vision.convert_vision(src, str(tmp_path / "bare"), prefix=wrong)
        message = str(err.value)
        if wrong:  # every tower tensor filtered out
            assert f"missing keys (the model needs them): {len(state)}\n" in message
        else:  # every tensor kept, the language model's named
            assert "    lm_head.weight\n" in message and "    model.language_model.embed_tokens.weight\n" in message
    rules = qwen_vl_vision.vision_rules("model.visual.")  # the default target: the `visual` subtree
    mapping, unknown = common.map_keys(rules, ["model.visual.blocks.2.attn.qkv.bias", "model.visual.blocks.2.bias"])
    assert mapping["model.visual.blocks.2.attn.qkv.bias"][0] == "visual/blocks/2/attn/qkv/bias"
    assert unknown == ["model.visual.blocks.2.bias"]


def test_conversion_errors_list_every_bad_key(tmp_path):
    model = torch_tower(CONFIGS["tanh_merge3"][0])
    state = state_dict_numpy(model)
    config = dict(CONFIGS["tanh_merge3"][0])
    del state["blocks.1.norm2.weight"]
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:, :40]
    state["blocks.0.attn.lora_A.weight"] = np.zeros((2, 2), np.float32)
    src = write_checkpoint(tmp_path / "bad", state, config)
    with pytest.raises(common.ConversionError) as err:
        qwen_vl_vision.convert_vision(src, str(tmp_path / "out"))
    message = str(err.value)
    assert src in message and "unknown keys (no rule maps them): 1\n    blocks.0.attn.lora_A.weight" in message
    assert "missing keys (the model needs them): 1\n    blocks/1/norm2/scale" in message
    assert "blocks.0.attn.qkv.weight -> blocks/0/attn/qkv/kernel: got (40, 144), expected (48, 144)" in message
    assert not (tmp_path / "out" / "params" / "visual.safetensors").exists(), "partial output left behind"

    fewer = write_checkpoint(tmp_path / "fewer", state_dict_numpy(model), dict(config, depth=1))
    with pytest.raises(common.ConversionError, match=r"blocks.1.norm1.weight -> blocks/1/norm1/scale \(not a param"):
        qwen_vl_vision.convert_vision(fewer, str(tmp_path / "out"))


def test_bad_configs_and_inputs_are_named():
    arguments = CONFIGS["silu_window"][0]
    bad = {"spatial_merge_stride": 2, "in_chans": 4, "fullatt_block_indexes": [1, 3], "num_heads": 16,
           "window_size": 4, "hidden_act": "swish", "rope_parameters": {"rope_type": "default"}}
    expected = {"spatial_merge_stride": r"unknown Qwen2.5-VL vision config keys \['spatial_merge_stride'\]",
                "in_chans": r"in_chans=4 differs from in_channels=3",
                "fullatt_block_indexes": r"fullatt_block_indexes=\[1, 3\]: expected distinct block indexes in \[0, "
                                         r"depth=3\)",
                "num_heads": r"hidden_size=32 / num_heads=16: the head dim must be a multiple of 4",
                "window_size": r"window_size=4 is smaller than one merge group",
                "hidden_act": r"hidden_act='swish'", "rope_parameters": r"rope_parameters=\{'rope_type': 'default'\}"}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=rf"^src/config.json: .*{expected[key]}"):
            qv.VisionConfig.from_transformers(dict(arguments, **{key: value}), "src/config.json")
    assert qv.VisionConfig.from_transformers({"vision_config": dict(arguments, rope_theta=50.0)}).rope_theta == 50.0

    config = qv.VisionConfig.from_transformers(arguments)
    init = lambda patches, grids: jax.eval_shape(  # noqa: E731
        lambda: qv.VisionTransformer(config).init(jax.random.key(0), patches, grids))
    with pytest.raises(ValueError, match=r"patches \(20, 96\): grid_thw \(\(1, 4, 4\),\) hold 16 patches"):
        init(jnp.zeros((20, 96)), ((1, 4, 4),))
    with pytest.raises(ValueError, match=r"patches \(16, 48\): expected \(N, 96\)"):
        init(jnp.zeros((16, 48)), ((1, 4, 4),))
    with pytest.raises(ValueError, match=r"grid_thw \(\(1, 4, 3\),\): .* multiples of spatial_merge_size=2"):
        init(jnp.zeros((12, 96)), ((1, 4, 3),))


def test_remat_rematerialises():
    config = qv.VisionConfig.from_transformers(CONFIGS["silu_window"][0])
    patches, grids = qv.example_inputs(config)
    params = qv.param_shapes(config)
    loss = lambda p: jnp.sum(qv.VisionTransformer(config, remat=True).apply({"params": p}, patches, grids))  # noqa
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_full_size_parameter_count_matches_transformers():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device("meta"):
        model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**FULL))
        assert sum(p.numel() for p in model.parameters()) == FULL_PARAMETERS
    assert qv.VisionConfig.from_transformers(FULL) == qv.QWEN2_5_VL_7B
    shapes = qv.param_shapes(qv.QWEN2_5_VL_7B)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == FULL_PARAMETERS


# --- the image processor ------------------------------------------------------------------------------

def transformers_processor(arguments: dict, folder):
    """transformers' processor saved and reloaded as AutoImageProcessor does (here: the PIL backend, as
    torchvision is not installed), and the preprocessor_config.json it wrote."""
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(**arguments).save_pretrained(folder)
    return AutoImageProcessor.from_pretrained(folder), folder / "preprocessor_config.json"


def random_images(sizes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for height, width in sizes]


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_processor_matches_transformers(name, tmp_path):
    arguments, sizes = PROCESSORS[name]
    reference, path = transformers_processor(arguments, tmp_path)
    assert type(reference).__name__ == "Qwen2VLImageProcessorPil"
    config = qp.ImageProcessorConfig.from_file(path)
    images = random_images(sizes)
    for group in [[image] for image in images] + [images]:  # each alone, then all together
        expected = reference(images=group, return_tensors="np")
        patches, grids = qp.preprocess(group, config)
        np.testing.assert_array_equal(grids, expected["image_grid_thw"])
        assert grids.dtype == np.int64 and patches.dtype == np.float32
        np.testing.assert_array_equal(patches, expected["pixel_values"])  # bitwise: the same float32 steps
    resized = {(h, w): tuple(int(n) * config.patch_size for n in grid[1:])
               for (h, w), grid in zip(sizes, qp.preprocess(images, config)[1])}
    if config.do_resize:  # the sizes reach every branch of smart_resize
        assert any(h * w > new[0] * new[1] for (h, w), new in resized.items())
        assert any(h * w < new[0] * new[1] for (h, w), new in resized.items())
        assert any((h, w) == new for (h, w), new in resized.items())


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for height in range(1, 120, 7):
        for width in range(1, 300, 11):
            for factor, low, high in ((28, 56 * 56, 28 * 28 * 1280), (8, 256, 1280), (6, 100, 600)):
                if max(height, width) / min(height, width) > 200:
                    with pytest.raises(ValueError, match=f"image {height} x {width}: aspect ratio above 200"):
                        qp.smart_resize(height, width, factor, low, high)
                    continue
                assert qp.smart_resize(height, width, factor, low, high) == smart_resize(height, width, factor, low,
                                                                                        high)


def test_processor_config_keys_and_bad_images(tmp_path):
    from transformers import AutoImageProcessor

    released = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": list(qp.CLIP_MEAN), "image_std": list(qp.CLIP_STD),
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    # transformers' defaults but max_pixels (its default is 28 * 28 * 1280)
    assert qp.ImageProcessorConfig.from_dict(released) == dataclasses.replace(qp.ImageProcessorConfig(),
                                                                              max_pixels=12845056)
    # size alone, and min / max_pixels overriding it: as transformers reads them
    for extra in ({}, {"max_pixels": 900}):
        data = dict(size={"shortest_edge": 100, "longest_edge": 5000}, image_processor_type="Qwen2VLImageProcessor",
                    **extra)
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
        size = AutoImageProcessor.from_pretrained(tmp_path).size
        config = qp.ImageProcessorConfig.from_file(tmp_path / "preprocessor_config.json")
        assert (config.min_pixels, config.max_pixels) == (size.shortest_edge, size.longest_edge)
    with pytest.raises(ValueError, match=r"^p.json: unknown Qwen2-VL image processor keys \['do_pad'\]"):
        qp.ImageProcessorConfig.from_dict(dict(released, do_pad=True), "p.json")
    with pytest.raises(ValueError, match=r"image_processor_type='CLIPImageProcessor'"):
        qp.ImageProcessorConfig.from_dict(dict(released, image_processor_type="CLIPImageProcessor"))
    with pytest.raises(ValueError, match=r"size=\{'height': 4\}: expected"):
        qp.ImageProcessorConfig.from_dict({"size": {"height": 4}})
    with pytest.raises(FileNotFoundError, match="missing.json: config file not found"):
        qp.ImageProcessorConfig.from_file(tmp_path / "missing.json")

    config = qp.ImageProcessorConfig()
    with pytest.raises(ValueError, match=r"image 1: float32 \(8, 8, 3\): expected an RGB uint8 array"):
        qp.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], config)
    with pytest.raises(ValueError, match=r"image 0: uint8 \(8, 8, 4\)"):
        qp.preprocess([np.zeros((8, 8, 4), np.uint8)], config)
    with pytest.raises(ValueError, match=r"image 0: 30 x 28 with do_resize=False: .* multiples of .* = 28"):
        qp.preprocess([np.zeros((30, 28, 3), np.uint8)], qp.ImageProcessorConfig(do_resize=False))


@pytest.mark.parametrize("converted", ["silu_window"], indirect=True)
def test_processor_to_tower_end_to_end(converted, tmp_path):
    """transformers' processor + tower against ours, on two images that both shrink."""
    _, model, config, params, _, _, _ = converted
    arguments, _ = PROCESSORS["bicubic"]
    reference, path = transformers_processor(arguments, tmp_path)
    images = random_images([(50, 30), (20, 70)], seed=3)
    expected = reference(images=images, return_tensors="np")
    ref = torch_forward(model, expected["pixel_values"], expected["image_grid_thw"].tolist())
    patches, grids = qp.preprocess(images, qp.ImageProcessorConfig.from_file(path))
    got = flax_forward(config, params, patches, tuple(map(tuple, grids.tolist())))
    error = relative_error(got, ref)
    print(f"end to end {grids.tolist()}: max relative error {error:.2e}")
    assert error <= TOLERANCE
