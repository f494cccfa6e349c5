"""State-dict merging on ``nlmerge.ops`` (DESIGN.md, "Semantics").

- :func:`task_vectors`: ``theta_t - theta_base`` per expert.
- :func:`average`: weighted mean of state dicts.
- :func:`task_arithmetic`: ``theta_base + lam * sum_t w_t tau_t``.
- :func:`ties`: TIES (trim, elect sign, disjoint merge), TIES or mergekit convention.
- :func:`tall`: TALL masks (:class:`TallMasks` rebuilds, saves and loads every task's model).
- :func:`generalized_task_arithmetic` (:func:`dare_linear`, :func:`dare_ties`, :func:`breadcrumbs`,
  :func:`breadcrumbs_ties`; :func:`merge_tensor` per key, :data:`METHODS`): mergekit's family.
- :func:`consensus`: keep ``tau_MTL`` where at least ``k`` TALL masks agree.

Common rules: every function returns new dicts in the base's key order and dtypes and never
modifies its inputs. Floating tensors (fp32, fp16, bf16) are merged, with task vectors computed in
fp32; integer and bool buffers, non-tensor entries and keys matching an ``exclude`` glob pattern
(``fnmatch.fnmatchcase``) are copied from the base. Missing or extra keys, or shapes, dtypes and
devices that differ from the base's, raise ValueError naming the key and the model; NaN/Inf inputs
raise ValueError naming the key and the model. ``backend`` is passed to every op.
"""
from nlmerge.merge.basic import average, task_arithmetic, task_vectors
from nlmerge.merge.generalized import (METHODS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties,
                                      generalized_task_arithmetic, merge_tensor)
from nlmerge.merge.tall import TallMasks, consensus, tall
from nlmerge.merge.ties import ties

__all__ = ["TallMasks", "average", "consensus", "tall", "task_arithmetic", "task_vectors", "ties"]
__all__ += ["METHODS", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "generalized_task_arithmetic",
            "merge_tensor"]
