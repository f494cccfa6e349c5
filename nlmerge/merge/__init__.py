"""State-dict merging on ``nlmerge.ops`` (DESIGN.md, "Semantics").

- :func:`task_vectors`: ``theta_t - theta_base`` per expert.
- :func:`average`: weighted mean of state dicts.
- :func:`task_arithmetic`: ``theta_base + lam * sum_t w_t tau_t``.
- :func:`ties`: TIES (trim, elect sign, disjoint merge), TIES or mergekit convention.
- :func:`tall`: TALL masks (:class:`TallMasks` rebuilds, saves and loads every task's model).
- :func:`generalized_task_arithmetic` (:func:`dare_linear`, :func:`dare_ties`, :func:`breadcrumbs`,
  :func:`breadcrumbs_ties`; :func:`merge_tensor` per key, :data:`METHODS`): mergekit's family.
- :func:`consensus`: keep ``tau_MTL`` where at least ``k`` TALL masks agree.

Common rules: every function returns new dicts in the base's key order and never modifies its
inputs. Floating tensors (fp32, fp16, bf16) are merged, with task vectors computed in fp32;
integer and bool buffers, non-tensor entries and keys matching an ``exclude`` glob pattern
(``fnmatch.fnmatchcase``) are copied from the base. Missing or extra keys, or shapes, dtypes and
devices that differ from the base's, raise ValueError naming the key and the model; NaN/Inf inputs
raise ValueError naming the key and the model. ``backend`` is passed to every op.

Output dtype: every merged key comes back in ``out_dtype`` (default: the base's dtype of that key),
computed in fp32 and rounded once. A result that does not fit it (an fp16 sum beyond 65504, an fp32
overflow) is never handed back as Inf: the merge raises ``NonFiniteResultError`` (a ValueError)
naming the key and, where it fits, suggesting ``out_dtype=torch.float32``.

BatchNorm running statistics: keys whose last dotted component is ``running_mean`` or
``running_var`` (found by name: a state dict carries no module types) are not task vectors, and no
method merges them (nor counts them in a TIES threshold): with ``running_stats="average"`` (the
default) they are the plain, unweighted mean of the experts' values (so a merged variance is never
negative; for :func:`average`, of all models' values); with ``running_stats="base"`` the base's
values. Either way they are placeholders to re-estimate on data after the merge (a pass over
task data in train mode; REPAIR/TACT in ``nlmerge.correct`` correct the merged model's statistics
on data as well). TALL stores them apart (:attr:`TallMasks.stats`), without masks; every task
model takes them. ``num_batches_tracked`` is an integer buffer, copied from the base; an excluded
key is copied too. Running variances read must be >= 0 and finite (ValueError naming the key and
the model).
"""
from nlmerge.merge.basic import average, task_arithmetic, task_vectors
from nlmerge.merge.generalized import (METHODS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties,
                                      generalized_task_arithmetic, merge_tensor)
from nlmerge.merge.tall import TallMasks, consensus, tall
from nlmerge.merge.ties import ties

__all__ = ["TallMasks", "average", "consensus", "tall", "task_arithmetic", "task_vectors", "ties"]
__all__ += ["METHODS", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "generalized_task_arithmetic",
            "merge_tensor"]
