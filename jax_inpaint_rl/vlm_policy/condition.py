"""What the frozen DiT is conditioned on, from a completion: one forward of [system + user("Picture 1: <image>"
+ instruction) + assistant + completion + <|im_end|>] (sampling.sequence_inputs), its last hidden states with the
gap between the padded prompt and the completion closed (each row's tokens first, in order, padding after), then
the template's system prefix dropped (`drop`: the pipeline's prompt_template_encode_start_idx, the same count in
every row because every row starts at slot 0), zero-masked padding after the valid tokens: the layout the
family's encode_prompt gives the DiT. Unlike the seed (which drops num_padding + 64 after removing the padding,
so a left-padded row loses user tokens), the drop counts template tokens only.

`params` decides who embeds the completion (config policy.condition_from): the LoRA-merged VLM ('policy', the
seed's choice) or the frozen base ('base').
"""
import jax.numpy as jnp

from jax_inpaint_rl.vlm_policy import sampling


def compact(values, mask):
    """Each row's masked-in entries first, in order, the rest after: (values, mask) of the same shapes."""
    order = jnp.argsort(~mask.astype(bool), axis=1, stable=True)
    gather = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa
    return gather(values), gather(mask)


def condition(vlm, params, prompts: sampling.Prompts, tokens, mask, *, end_id: int, drop: int) -> dict:
    """{'text': (B, P + T + 1 - drop, D) hidden states, 'text_mask': (B, P + T + 1 - drop) int32}."""
    ids, full_mask, positions = sampling.sequence_inputs(prompts, tokens, mask, end_id)
    hidden, _ = vlm.apply({"params": params}, ids, positions, full_mask, image_features=prompts.image_features)
    hidden, kept = compact(hidden, full_mask)
    return {"text": hidden[:, drop:] * kept[:, drop:, None].astype(hidden.dtype), "text_mask": kept[:, drop:]}


def kept_ids(prompts: sampling.Prompts, tokens, mask, *, end_id: int, drop: int):
    """The token ids behind `condition`'s rows (B, P + T + 1 - drop) and their mask: what the DiT reads."""
    ids, full_mask, _ = sampling.sequence_inputs(prompts, tokens, mask, end_id)
    ids, kept = compact(ids, full_mask)
    return ids[:, drop:] * kept[:, drop:], kept[:, drop:]
