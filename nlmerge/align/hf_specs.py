"""Spec builders from a Hugging Face ``config.json``: the Llama family (``llama``, ``mistral``,
``qwen2``) with grouped-query attention, ViT, CLIP (both towers, or one).

``spec_from_config(config, keys)`` picks the builder from ``model_type``; ``keys`` (the checkpoint's
tensor names, when known) settles the naming where transformers versions differ. Every builder
returns ``(PermutationSpec, sites)`` as those of ``nlmerge.align.specs``.
"""
from collections.abc import Mapping

from nlmerge.align.spec import PermutationSpec, check_int
from nlmerge.align.specs import CLIP_LAYER_NAMES, _add, _w, attention_perms, hf_encoder_spec, hf_vit_spec

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = LLAMA_FAMILY + ("vit", "clip", "clip_vision_model", "clip_text_model")


def _get(config, name, default=None):
    """``config[name]`` of a dict or an attribute of a config object; ``default`` when absent or None."""
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    return default if value is None else value


def _need(config, name, minimum=1):
    value = _get(config, name)
    if value is None:
        raise ValueError(f"config has no {name!r}")
    return check_int(value, f"config's {name}", minimum)


def llama_spec(config, *, prefix="model."):
    """Spec of a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` checkpoint.

    Symmetries (each keeps the function exactly):

    - ``residual``: one permutation of the residual stream: ``embed_tokens`` and ``lm_head``
      columns, every RMSNorm weight (RMSNorm normalizes by the mean square over all units, which a
      permutation does not change), the input axis of q/k/v/gate/up, the output axis (and bias) of
      o_proj and down_proj.
    - ``layer.{i}.mlp``: the MLP's hidden units (gate/up rows and biases, down_proj columns): the
      SiLU gate acts unit by unit.
    - ``layer.{i}.attn.q``, ``.k``, ``.v``, ``.o`` (``.qk``, ``.vo`` without grouped-query
      attention: one permutation serves q and k, one v and o), tied in the attention group
      ``layer.{i}.attn``
      (see ``AttentionGroup``): whole key/value heads, each carrying its group of
      ``num_attention_heads / num_key_value_heads`` query heads; query heads within their group
      (every query head of a group reads the same key/value head); units within a value head,
      with the matching columns of o_proj for every query head of its group. **Not** q/k units
      within a head: rotary embeddings rotate each pair of q/k dimensions by its own frequency, so
      moving a unit to another position changes its rotation and the attention scores.

    Parameters
    ----------
    config : Mapping or config object
        ``model_type`` (llama, mistral, qwen2), ``hidden_size``, ``intermediate_size``,
        ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (default: the
        attention heads), ``head_dim`` (default ``hidden_size / num_attention_heads``),
        ``tie_word_embeddings`` (default False: no config of this family ties by default),
        ``attention_bias`` (llama: q/k/v/o biases), ``mlp_bias`` (llama: gate/up/down biases); qwen2
        always has q/k/v biases.
    prefix : str
        Prefix of the decoder's names (``"model."`` in ``*ForCausalLM``, ``""`` in ``*Model``).

    Returns
    -------
    (PermutationSpec, dict)
        The spec (``lm_head.weight`` only when the embeddings are untied: a tied checkpoint holds
        none; drop it from a module's ``state_dict()`` before applying) and the sites: decoder layer
        outputs (residual), q/k/v projection outputs, the o_proj input, the down_proj input (mlp).

    Raises
    ------
    ValueError, TypeError
        A model_type outside the family, a missing or non-positive size, key/value heads that do
        not divide the attention heads.
    """
    model_type = _get(config, "model_type")
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"llama_spec: model_type {model_type!r} is not one of {list(LLAMA_FAMILY)}")
    depth = _need(config, "num_hidden_layers")
    hidden = _need(config, "hidden_size")
    heads = _need(config, "num_attention_heads")
    kv_heads = check_int(_get(config, "num_key_value_heads", heads), "config's num_key_value_heads", 1)
    if heads % kv_heads:
        raise ValueError(f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    if _get(config, "head_dim") is None and hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by {heads} heads and the config has no head_dim")
    qkv_bias = model_type == "qwen2" or bool(_get(config, "attention_bias", False))
    o_bias = model_type == "llama" and bool(_get(config, "attention_bias", False))
    mlp_bias = model_type == "llama" and bool(_get(config, "mlp_bias", False))

    def linear(layer, name, axis, bias):
        return _w(layer, name, axis, ("weight", "bias") if bias else ("weight",))

    residual = [(f"{prefix}embed_tokens.weight", 1), (f"{prefix}norm.weight", 0)]
    if not _get(config, "tie_word_embeddings", False):
        residual.append(("lm_head.weight", 1))
    perms, sites, groups = {}, {"residual": []}, {}
    for i in range(depth):
        layer = f"{prefix}layers.{i}."
        residual += [(f"{layer}input_layernorm.weight", 0), (f"{layer}post_attention_layernorm.weight", 0)]
        residual += [(f"{layer}self_attn.{m}_proj.weight", 1) for m in "qkv"]
        residual += [(f"{layer}mlp.{m}_proj.weight", 1) for m in ("gate", "up")]
        residual += linear(layer, "self_attn.o_proj", 0, o_bias) + linear(layer, "mlp.down_proj", 0, mlp_bias)
        attn = f"{layer}self_attn."
        _add(perms, sites, groups, attention_perms(
            f"layer.{i}.attn", heads,
            {**{m: linear(attn, f"{m}_proj", 0, qkv_bias) for m in "qkv"}, "o": _w(attn, "o_proj", 1)},
            {**{m: f"{attn}{m}_proj" for m in "qkv"}, "o": (f"{attn}o_proj", "input")},
            kv_heads=kv_heads, qk_units=False))
        perms[f"layer.{i}.mlp"] = (linear(layer, "mlp.gate_proj", 0, mlp_bias) + linear(layer, "mlp.up_proj", 0, mlp_bias)
                                   + _w(layer, "mlp.down_proj", 1))
        sites["residual"].append(f"{prefix}layers.{i}")
        sites[f"layer.{i}.mlp"] = (f"{layer}mlp.down_proj", "input")
    return PermutationSpec({"residual": residual, **perms}, attention=groups), sites


def clip_text_spec(config, *, prefix="text_model.", head=None, perm_prefix=""):
    """Spec of CLIP's text tower (``CLIPTextModel``, or ``text_model.`` in ``CLIPModel``).

    ``config`` has ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads`` (the text
    config). The residual stream holds ``token_embedding`` and ``position_embedding`` columns,
    ``final_layer_norm`` and ``head`` (e.g. ``"text_projection"``) columns; layers as
    :func:`nlmerge.align.specs.hf_encoder_spec` (learned positions, no rotary embeddings: q/k
    units move within a head). ValueError / TypeError for a missing or bad size.
    """
    depth, hidden, heads = (_need(config, n) for n in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by {heads} heads")
    residual = ([(f"{prefix}embeddings.token_embedding.weight", 1), (f"{prefix}embeddings.position_embedding.weight", 1)]
                + _w(prefix, "final_layer_norm", 0, ("weight", "bias")))
    if head is not None:
        residual.append((f"{head}.weight", 1))
    return hf_encoder_spec(residual, f"{prefix}encoder.layers.{{}}", CLIP_LAYER_NAMES, depth, heads,
                           perm_prefix=perm_prefix)


def _merge_specs(*built):
    """One ``(spec, sites)`` from builders' results with disjoint permutation names."""
    perms, heads, attention, sites = {}, {}, {}, {}
    for spec, part in built:
        perms.update(spec.perms)
        heads.update({p: h for p, h in spec.heads.items() if p not in spec.grouped})
        attention.update(spec.attention)
        sites.update(part)
    return PermutationSpec(perms, heads=heads, attention=attention), sites


def _prefix_of(keys, candidates, marker):
    """The first candidate prefix ``c`` with ``c + marker`` among ``keys`` (the first candidate when
    ``keys`` is None)."""
    if keys is None:
        return candidates[0]
    for c in candidates:
        if c + marker in keys:
            return c
    raise ValueError(f"no tensor named {marker!r} under any of the prefixes {list(candidates)}")


def spec_from_config(config, keys=None):
    """``(PermutationSpec, sites)`` of a Hugging Face model from its config.

    Parameters
    ----------
    config : Mapping or config object
        A parsed ``config.json`` (or a transformers config) with ``model_type`` in ``SUPPORTED``:
        ``llama``, ``mistral``, ``qwen2`` (:func:`llama_spec`, ``*ForCausalLM`` names when ``keys``
        has ``lm_head`` or ``model.`` names, else the bare ``*Model`` names); ``vit``
        (:func:`nlmerge.align.specs.hf_vit_spec`: checkpoint names of ``ViTModel`` or, with a
        ``vit.`` prefix, ``ViTForImageClassification`` and its ``classifier``; transformers 5's
        module names when ``keys`` hold them); ``clip`` (both towers: permutations ``vision.*``
        and ``text.*``, ``visual_projection`` and ``text_projection`` columns; ``logit_scale`` is
        untouched); ``clip_vision_model``, ``clip_text_model`` (one tower).
    keys : collection of str, optional
        The checkpoint's (or module's) tensor names: picks the naming and prefixes. Without it:
        the names ``save_pretrained`` writes for the base model class.

    Returns
    -------
    (PermutationSpec, dict)

    Raises
    ------
    ValueError
        An unknown ``model_type`` (the message lists the supported ones), a config without the
        sizes the builder needs, or ``keys`` that fit none of the namings.
    """
    model_type = _get(config, "model_type")
    keys = None if keys is None else set(keys)
    if model_type in LLAMA_FAMILY:
        return llama_spec(config, prefix=_prefix_of(keys, ("model.", ""), "embed_tokens.weight"))
    if model_type == "vit":
        prefix = _prefix_of(keys, ("", "vit."), "embeddings.cls_token")
        flavor = "vit-v5" if keys is not None and f"{prefix}layers.0.attention.q_proj.weight" in keys else "vit"
        head = "classifier" if keys is not None and "classifier.weight" in keys else None
        pooler = keys is None or f"{prefix}pooler.dense.weight" in keys
        return hf_vit_spec(config, flavor=flavor, prefix=prefix, head=head, pooler=pooler)
    if model_type == "clip":
        vision, text = _get(config, "vision_config"), _get(config, "text_config")
        if vision is None or text is None:
            raise ValueError("a clip config needs vision_config and text_config")
        return _merge_specs(hf_vit_spec(vision, flavor="clip", head="visual_projection", perm_prefix="vision."),
                            clip_text_spec(text, head="text_projection", perm_prefix="text."))
    if model_type == "clip_vision_model":
        prefix = _prefix_of(keys, ("vision_model.", ""), "embeddings.class_embedding")
        head = "visual_projection" if keys is not None and "visual_projection.weight" in keys else None
        return hf_vit_spec(config, flavor="clip", prefix=prefix, head=head)
    if model_type == "clip_text_model":
        prefix = _prefix_of(keys, ("text_model.", ""), "embeddings.token_embedding.weight")
        head = "text_projection" if keys is not None and "text_projection.weight" in keys else None
        return clip_text_spec(config, prefix=prefix, head=head)
    raise ValueError(f"model_type {model_type!r} has no permutation spec; supported: {', '.join(SUPPORTED)}")
