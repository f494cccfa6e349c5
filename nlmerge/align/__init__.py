"""Alignment: undo permutation symmetries between models.

- ``PermutationSpec``, ``apply_permutations``: which (parameter, axis) pairs each permutation acts
  on; ``aligned[w] = w.index_select(axis, perms[p])``.
- ``weight_matching``: Git Re-Basin coordinate descent on weights.
- ``activation_matching``: assignment on the cross-correlation of activations (one streaming pass).
- ``specs``: spec builders (MLP, CNN, ResNet, ViT of ``models``; Hugging Face ViT / CLIP vision).
- ``hf_specs``: specs from a Hugging Face config (Llama, Mistral, Qwen2 with grouped-query
  attention; ViT; CLIP): ``spec_from_config``.
- ``models``: the small plain-torch models the builders describe.

Rule: nothing the caller passes is changed. ``activation_matching`` runs the models in eval mode
under ``torch.no_grad`` and leaves them as they were (parameters, buffers, every module's
``training`` flag, no hooks), also when it raises; state dicts are read, never written. Numeric
parameters are range-checked (ValueError, or TypeError for a non-int, naming the parameter).
"""
from nlmerge.align.activation_matching import activation_matching
from nlmerge.align.hf_specs import clip_text_spec, llama_spec, spec_from_config
from nlmerge.align.spec import AttentionGroup, PermutationSpec, apply_permutations, check_permutation
from nlmerge.align.specs import cnn_spec, hf_vit_spec, mlp_spec, resnet_spec, vit_spec
from nlmerge.align.weight_matching import weight_matching

__all__ = [
    "AttentionGroup",
    "PermutationSpec",
    "activation_matching",
    "apply_permutations",
    "check_permutation",
    "clip_text_spec",
    "cnn_spec",
    "hf_vit_spec",
    "llama_spec",
    "mlp_spec",
    "resnet_spec",
    "spec_from_config",
    "vit_spec",
    "weight_matching",
]
