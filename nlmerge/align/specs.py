"""Spec builders: ``(PermutationSpec, sites)`` for the models of ``nlmerge.align.models`` and for
Hugging Face ViT / CLIP vision parameter names.

``sites`` maps each permutation to where its units show up as activations (see
``activation_matching``): a module name (its output) or ``(module_name, "input")``, or a list.
Attention layers give two tied permutations (``attention_perms``: q/k and v/o, one head order)
or four under grouped-query attention (``nlmerge.align.hf_specs``).
"""
from collections.abc import Mapping

from nlmerge.align.spec import AttentionGroup, PermutationSpec, check_int

_BN = ("weight", "bias", "running_mean", "running_var")


def _w(prefix, module, axis, names=("weight",)):
    return [(f"{prefix}{module}.{n}", axis) for n in names]


def mlp_spec(num_layers, prefix=""):
    """Spec of an ``nn.Sequential`` of ``num_layers`` Linears with a ReLU between each two
    (``models.MLP``: Linear k is module ``2k``).

    Parameters
    ----------
    num_layers : int
        Number of Linear layers (hidden permutations: ``num_layers - 1``).
    prefix : str
        Prefix of the Sequential's names in the state dict (e.g. ``"model."``).

    Returns
    -------
    (PermutationSpec, dict)
        Permutations ``hidden.{k}`` (output units of Linear k) and their sites (Linear k's output,
        before the ReLU).

    Raises
    ------
    ValueError, TypeError
        ``num_layers`` not an int >= 2 (fewer layers have no hidden permutation).
    """
    num_layers = check_int(num_layers, "num_layers", 2)
    perms, sites = {}, {}
    for k in range(num_layers - 1):
        perms[f"hidden.{k}"] = (_w(prefix, 2 * k, 0, ("weight", "bias")) + _w(prefix, 2 * (k + 1), 1))
        sites[f"hidden.{k}"] = f"{prefix}{2 * k}"
    return PermutationSpec(perms), sites


def cnn_spec(num_layers, *, norm="batch", prefix=""):
    """Spec of ``models.CNN``: ``features`` = ``[Conv, norm, ReLU]`` per layer, then ``head``.

    Parameters
    ----------
    num_layers : int
        Number of conv layers.
    norm : {"batch", "layer", None}
        BatchNorm (weight, bias, running_mean, running_var permuted with the channels), LayerNorm
        over channels (weight, bias), or none.
    prefix : str
        Prefix of the model's names.

    Returns
    -------
    (PermutationSpec, dict)
        Permutations ``conv.{k}`` (output channels of conv k); sites: the conv outputs.

    Raises
    ------
    ValueError, TypeError
        ``num_layers`` not an int >= 1; an unknown ``norm``.
    """
    names = {"batch": _BN, "layer": ("weight", "bias"), None: ()}
    if norm not in names:
        raise ValueError(f"norm must be 'batch', 'layer' or None, got {norm!r}")
    num_layers = check_int(num_layers, "num_layers", 1)
    step = 3 if norm else 2
    perms, sites = {}, {}
    for k in range(num_layers):
        conv = f"features.{step * k}"
        entries = _w(prefix, conv, 0, ("weight", "bias"))
        if norm:
            entries += _w(prefix, f"features.{step * k + 1}", 0, names[norm])
        entries += _w(prefix, f"features.{step * (k + 1)}", 1) if k + 1 < num_layers else _w(prefix, "head", 1)
        perms[f"conv.{k}"] = entries
        sites[f"conv.{k}"] = f"{prefix}{conv}"
    return PermutationSpec(perms), sites


def resnet_spec(num_stages, blocks_per_stage, prefix=""):
    """Spec of ``models.ResNet``: one permutation per residual stage, one per block's inner layer.

    Parameters
    ----------
    num_stages, blocks_per_stage : int
        The model's stages and blocks per stage (stages after the first start with a conv shortcut).
    prefix : str
        Prefix of the model's names.

    Returns
    -------
    (PermutationSpec, dict)
        ``stage{s}``: the residual stream of stage s (stem for s = 0, every block's ``conv2``/``bn2``
        and shortcut outputs, the next inputs, ``head``); ``stage{s}.block{b}``: ``conv1``/``bn1``
        outputs, ``conv2`` inputs. Sites: inputs of every block's ``act2`` (the residual sum) for a
        stage; ``conv1`` outputs for a block.

    Raises
    ------
    ValueError, TypeError
        ``num_stages`` or ``blocks_per_stage`` not an int >= 1.
    """
    num_stages = check_int(num_stages, "num_stages", 1)
    blocks_per_stage = check_int(blocks_per_stage, "blocks_per_stage", 1)
    perms, sites = {}, {}
    stream = "stage0"
    perms[stream] = _w(prefix, "stem.0", 0) + _w(prefix, "stem.1", 0, _BN)
    for s in range(num_stages):
        out = f"stage{s}"
        perms.setdefault(out, [])
        sites[out] = []
        for b in range(blocks_per_stage):
            block = f"stages.{s}.{b}"
            inner = f"{out}.block{b}"
            perms[inner] = (_w(prefix, f"{block}.conv1", 0) + _w(prefix, f"{block}.bn1", 0, _BN)
                            + _w(prefix, f"{block}.conv2", 1))
            sites[inner] = f"{prefix}{block}.conv1"
            perms[stream] += _w(prefix, f"{block}.conv1", 1)
            perms[out] += _w(prefix, f"{block}.conv2", 0) + _w(prefix, f"{block}.bn2", 0, _BN)
            if s and b == 0:
                perms[stream] += _w(prefix, f"{block}.shortcut.0", 1)
                perms[out] += _w(prefix, f"{block}.shortcut.0", 0) + _w(prefix, f"{block}.shortcut.1", 0, _BN)
            sites[out].append((f"{prefix}{block}.act2", "input"))
            stream = out
    perms[stream] += _w(prefix, "head", 1)
    return PermutationSpec(perms), sites


def attention_perms(name, heads, pairs, sites, *, kv_heads=None, qk_units=True):
    """The permutations of one attention layer, tied in an :class:`AttentionGroup`.

    Parameters
    ----------
    name : str
        Group name; the permutations are ``{name}.qk`` / ``{name}.vo`` when there are as many
        key/value heads as query heads (one permutation serves q and k, one v and o), else
        ``{name}.q``, ``.k``, ``.v``, ``.o``.
    heads : int
        Query heads.
    pairs : Mapping[str, list of (str, int)]
        Per role ``"q"``, ``"k"``, ``"v"``, ``"o"``: the (parameter, axis) pairs of the query, key
        and value units (projection rows, biases) and of the output projection's input units.
    sites : Mapping[str, site]
        Per role, where its units show up as activations (a site as ``activation_matching`` takes).
    kv_heads : int, optional
        Key/value heads (grouped-query attention); default ``heads``.
    qk_units : bool
        Whether q/k units may move within a head (False with rotary embeddings).

    Returns
    -------
    (dict, dict, dict)
        ``{perm_name: pairs}``, ``{perm_name: [sites]}`` and ``{name: AttentionGroup}``.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    roles = ("qk", "qk", "vo", "vo") if kv_heads == heads else tuple("qkvo")
    names = [f"{name}.{r}" for r in roles]
    perms, perm_sites = {}, {}
    for role, perm in zip("qkvo", names):
        perms.setdefault(perm, []).extend(pairs[role])
        perm_sites.setdefault(perm, []).append(sites[role])
    return perms, perm_sites, {name: AttentionGroup(*names, heads, kv_heads, qk_units)}


def _add(perms, sites, groups, built):
    """Merge the ``(perms, sites, groups)`` of :func:`attention_perms` into a builder's."""
    for into, part in zip((perms, sites, groups), built):
        into.update(part)


def vit_spec(depth, heads, prefix=""):
    """Spec of ``models.ViT``.

    Parameters
    ----------
    depth, heads : int
        Number of blocks and attention heads.
    prefix : str
        Prefix of the model's names.

    Returns
    -------
    (PermutationSpec, dict)
        ``residual``: the residual stream (patch embedding, ``cls_token``, ``pos_embed``, every
        norm, each block's ``attn.proj`` and ``mlp.fc2`` outputs, q/k/v and fc1 inputs, ``head``);
        ``blocks.{i}.attn.qk`` (q and k outputs) and ``blocks.{i}.attn.vo`` (v outputs, ``proj``
        inputs), tied in the attention group ``blocks.{i}.attn`` (same head order; units within a
        head permuted separately for q/k and for v/o); ``blocks.{i}.mlp``: fc1 outputs, fc2
        inputs. Sites: block outputs; q and k outputs; v output and ``attn.proj`` input;
        ``mlp.fc1`` output.

    Raises
    ------
    ValueError, TypeError
        ``depth`` or ``heads`` not an int >= 1.
    """
    depth, heads = check_int(depth, "depth", 1), check_int(heads, "heads", 1)
    wb = ("weight", "bias")
    residual = (_w(prefix, "patch_embed", 0, wb) + [(f"{prefix}cls_token", 2), (f"{prefix}pos_embed", 2)]
                + _w(prefix, "norm", 0, wb) + _w(prefix, "head", 1))
    perms, sites, groups = {}, {"residual": []}, {}
    for i in range(depth):
        blk = f"blocks.{i}"
        residual += (_w(prefix, f"{blk}.norm1", 0, wb) + _w(prefix, f"{blk}.norm2", 0, wb)
                     + [(f"{prefix}{blk}.attn.{m}.weight", 1) for m in "qkv"]
                     + _w(prefix, f"{blk}.attn.proj", 0, wb) + _w(prefix, f"{blk}.mlp.fc1", 1)
                     + _w(prefix, f"{blk}.mlp.fc2", 0, wb))
        attn = f"{prefix}{blk}.attn"
        _add(perms, sites, groups, attention_perms(
            f"{blk}.attn", heads, {**{m: _w(attn, f".{m}", 0, wb) for m in "qkv"}, "o": _w(attn, ".proj", 1)},
            {"q": f"{attn}.q", "k": f"{attn}.k", "v": f"{attn}.v", "o": (f"{attn}.proj", "input")}))
        perms[f"{blk}.mlp"] = _w(prefix, f"{blk}.mlp.fc1", 0, wb) + _w(prefix, f"{blk}.mlp.fc2", 1)
        sites["residual"].append(f"{prefix}{blk}")
        sites[f"{blk}.mlp"] = f"{prefix}{blk}.mlp.fc1"
    perms = {"residual": residual, **perms}
    return PermutationSpec(perms, attention=groups), sites


def _config_value(config, *names):
    for name in names:
        if isinstance(config, Mapping) and name in config:
            return config[name]
        if not isinstance(config, Mapping) and hasattr(config, name):
            return getattr(config, name)
    raise ValueError(f"config has none of {names}")


def hf_vit_spec(config, *, flavor="vit", prefix=None, pooler=None, head=None, perm_prefix=""):
    """Spec for the parameter names of Hugging Face ``ViTModel`` or CLIP's vision tower, with no
    download and no ``transformers``.

    Parameters
    ----------
    config : object or Mapping
        With ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads`` (and
        ``intermediate_size``), as ``ViTConfig`` / ``CLIPVisionConfig`` or a dict.
    flavor : {"vit", "vit-v5", "clip"}
        ``"vit"``: ``ViTModel`` checkpoint names of transformers 4 (``embeddings.*``,
        ``encoder.layer.{i}.attention.attention.query``, ..., ``layernorm``), as checkpoint files
        on the hub hold them; ``"vit-v5"``: the module names of transformers 5's ``ViTModel``
        (``layers.{i}.attention.q_proj``, ``mlp.fc1``, ...); ``"clip"``: ``CLIPVisionModel`` names
        (``embeddings.*``, ``pre_layrnorm``, ``encoder.layers.{i}.*``, ``post_layernorm``; under
        ``vision_model.`` in transformers 4, at the top level in transformers 5: ``prefix=""``).
    prefix : str, optional
        Prefix of every name; default ``""`` for ViT, ``"vision_model."`` for CLIP (use ``"vit."``
        for ``ViTForImageClassification``).
    pooler : bool, optional
        ViT only: include ``pooler.dense`` (input axis). Default: True when ``head`` is None.
    head : str, optional
        Name of a Linear reading the residual stream (input axis permuted), e.g. ``"classifier"``
        or ``"visual_projection"``; given without prefix.
    perm_prefix : str
        Prefix of the permutation names (``"vision."`` in a whole ``CLIPModel``).

    Returns
    -------
    (PermutationSpec, dict)
        As :func:`hf_encoder_spec`: ``residual``, ``layer.{i}.attn.qk`` / ``.vo`` (the attention
        group ``layer.{i}.attn``), ``layer.{i}.mlp``, and their sites.

    Raises
    ------
    ValueError, TypeError
        An unknown ``flavor``; a config without the sizes, or with a size that is not an int >= 1,
        or a head count that does not divide ``hidden_size``.
    """
    if flavor not in ("vit", "vit-v5", "clip"):
        raise ValueError(f"flavor must be 'vit', 'vit-v5' or 'clip', got {flavor!r}")
    depth = check_int(_config_value(config, "num_hidden_layers", "num_layers"), "config's num_hidden_layers", 1)
    hidden = check_int(_config_value(config, "hidden_size", "hidden"), "config's hidden_size", 1)
    heads = check_int(_config_value(config, "num_attention_heads", "num_heads", "heads"),
                      "config's num_attention_heads", 1)
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by {heads} heads")
    wb = ("weight", "bias")
    if flavor in ("vit", "vit-v5"):
        p = "" if prefix is None else prefix
        residual = ([(f"{p}embeddings.cls_token", 2), (f"{p}embeddings.position_embeddings", 2)]
                    + _w(p, "embeddings.patch_embeddings.projection", 0, wb) + _w(p, "layernorm", 0, wb))
        if pooler if pooler is not None else head is None:
            residual += _w(p, "pooler.dense", 1)
        if flavor == "vit":
            layer_fmt = f"{p}encoder.layer.{{}}"
            names = {"q": "attention.attention.query", "k": "attention.attention.key",
                     "v": "attention.attention.value", "o": "attention.output.dense",
                     "fc1": "intermediate.dense", "fc2": "output.dense",
                     "norms": ("layernorm_before", "layernorm_after")}
        else:
            layer_fmt = f"{p}layers.{{}}"
            names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                     "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                     "norms": ("layernorm_before", "layernorm_after")}
    else:
        p = "vision_model." if prefix is None else prefix
        residual = ([(f"{p}embeddings.class_embedding", 0), (f"{p}embeddings.patch_embedding.weight", 0),
                     (f"{p}embeddings.position_embedding.weight", 1)]
                    + _w(p, "pre_layrnorm", 0, wb) + _w(p, "post_layernorm", 0, wb))
        layer_fmt = f"{p}encoder.layers.{{}}"
        names = CLIP_LAYER_NAMES
    if head is not None:
        residual += [(f"{head}.weight", 1)]
    return hf_encoder_spec(residual, layer_fmt, names, depth, heads, perm_prefix=perm_prefix)


CLIP_LAYER_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
                    "fc1": "mlp.fc1", "fc2": "mlp.fc2", "norms": ("layer_norm1", "layer_norm2")}


def hf_encoder_spec(residual, layer_fmt, names, depth, heads, *, perm_prefix=""):
    """Spec of a pre-norm transformer encoder with LayerNorms (ViT, CLIP towers) from its names.

    Parameters
    ----------
    residual : list of (str, int)
        The residual stream's pairs outside the layers (embeddings, final norm, heads).
    layer_fmt : str
        Name of layer i with ``{}`` for i, e.g. ``"vision_model.encoder.layers.{}"``.
    names : Mapping
        Module names inside a layer: ``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``, and ``norms``
        (the two LayerNorms); every Linear and norm has a bias.
    depth, heads : int
        Layers and attention heads.
    perm_prefix : str
        Prefix of every permutation name (e.g. ``"vision."``).

    Returns
    -------
    (PermutationSpec, dict)
        ``{perm_prefix}residual``; per layer ``{perm_prefix}layer.{i}.attn.qk`` and ``.vo`` (the
        attention group ``layer.{i}.attn``: no rotary embeddings, so q/k units move within a head)
        and ``{perm_prefix}layer.{i}.mlp``. Sites: layer outputs (first element of the tuple);
        q and k outputs; v output and the output projection's input; the first MLP Linear's output.
    """
    wb = ("weight", "bias")
    residual = list(residual)
    perms, sites, groups = {}, {f"{perm_prefix}residual": []}, {}
    for i in range(depth):
        layer = layer_fmt.format(i) + "."
        for norm in names["norms"]:
            residual += _w(layer, norm, 0, wb)
        residual += [(f"{layer}{names[m]}.weight", 1) for m in ("q", "k", "v", "fc1")]
        residual += _w(layer, names["o"], 0, wb) + _w(layer, names["fc2"], 0, wb)
        _add(perms, sites, groups, attention_perms(
            f"{perm_prefix}layer.{i}.attn", heads,
            {**{m: _w(layer, names[m], 0, wb) for m in "qkv"}, "o": _w(layer, names["o"], 1)},
            {**{m: f"{layer}{names[m]}" for m in "qkv"}, "o": (f"{layer}{names['o']}", "input")}))
        perms[f"{perm_prefix}layer.{i}.mlp"] = _w(layer, names["fc1"], 0, wb) + _w(layer, names["fc2"], 1)
        sites[f"{perm_prefix}residual"].append(layer_fmt.format(i))
        sites[f"{perm_prefix}layer.{i}.mlp"] = f"{layer}{names['fc1']}"
    perms = {f"{perm_prefix}residual": residual, **perms}
    return PermutationSpec(perms, attention=groups), sites
