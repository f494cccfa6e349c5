"""Correction of variance collapse in merged models: TACT (per task) and REPAIR (one target).

``default_sites`` picks where to correct, ``activation_stats`` and ``variance_ratio`` measure,
``tact`` and ``repair`` build ``CorrectedModel`` wrappers (the shared merged model plus per-site
scale/shift buffers applied by forward hooks), ``correct_to`` does the same towards statistics
measured elsewhere (``repair_targets`` averages them as REPAIR does), and ``fold`` writes a
correction into the weights of the site's own linear/conv/norm layer (``fold_problem`` says which
sites fold). Built only on ``nlmerge.ops`` (``StreamingStats``).

Rule: the caller's models are run in eval mode (statistics are eval-mode statistics, whatever mode
the models came in) under ``torch.no_grad`` and left as they were: parameters, buffers, every
module's ``training`` flag, no hooks, also when a call raises. Numeric parameters are range-checked
(``eps`` finite and > 0).
"""
from nlmerge.correct.correction import (CorrectedModel, correct_to, fold, fold_problem, repair,
                                        repair_targets, tact)
from nlmerge.correct.sites import SiteStats, activation_stats, default_sites, variance_ratio

__all__ = [
    "CorrectedModel",
    "SiteStats",
    "activation_stats",
    "correct_to",
    "default_sites",
    "fold",
    "fold_problem",
    "repair",
    "repair_targets",
    "tact",
    "variance_ratio",
]
