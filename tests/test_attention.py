"""model.attention: every model attention goes through the selected kernel; a kernel this device lacks is refused."""
import jax
import jax.numpy as jnp
import pytest

from jax_inpaint_rl.models.flux import transformer as flux_transformer
from jax_inpaint_rl.models.layers import attention, conv_blocks, siglip


@pytest.fixture
def calls(monkeypatch):
    """The `implementation` each dot_product_attention call receives; 'auto' again afterwards."""
    seen = []
    original = jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return original(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    yield seen
    attention.use("auto")


def _attend_everywhere():
    """One call through each model's attention helper: Flux (also SD3's and Calligrapher's), UNet / VAE, SigLIP."""
    heads = jnp.ones((1, 4, 2, 8))
    flat = heads.reshape(1, 4, 16)
    flux_transformer.attention(heads, heads, heads)
    conv_blocks.attention(flat, flat, flat, heads=2)
    siglip._attend(flat, flat, flat, heads=2)


def test_the_selected_kernel_reaches_every_model(calls):
    attention.use("xla")
    _attend_everywhere()
    attention.use("auto")
    _attend_everywhere()
    assert calls == ["xla"] * 3 + [None] * 3


def test_unknown_or_unavailable_kernels_are_named():
    with pytest.raises(ValueError, match=r"model.attention='flash': expected one of \['auto', 'cudnn', 'xla'\]"):
        attention.use("flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="model.attention='cudnn' needs an NVIDIA GPU; this process runs on"):
            attention.use("cudnn")
