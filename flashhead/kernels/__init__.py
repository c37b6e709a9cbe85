"""FlashHead's kernel interface: one op per step of a decode step, behind which backends compute it.

Steps (:mod:`.ops`):

* :func:`stage1_scores` (``h`` against every centroid, float, int8 or int4: :class:`Centroids`) and
  :func:`top_clusters` (the top ``p`` on the same device);
* :func:`cluster_logits`: stage 2, the exact logits of the probed clusters' rows (fp32, bf16, fp16 or
  Q8_0) and of the always-scored ids: the candidates for sampling and its tail;
* :func:`greedy`: stage 2 fused with the argmax, ties to the smallest token id.

Backends (:mod:`.backend`): the torch reference (:mod:`.reference`, any device: the specification) and
Triton on CUDA (:mod:`.triton_stage1`, :mod:`.triton_stage2`), tested on CPU under Triton's interpreter.
:class:`KernelHead` holds a head's index in the kernels' layout and runs a whole greedy step.
The compiled CPU kernels (``flashhead/_kernels.py``) are not behind this interface yet: ``FlashHead``
still calls them itself.
"""

from .backend import backend_for
from .centroids import MODES, Centroids, float_centroids, int4_centroids, int8_centroids
from .ops import cluster_logits, greedy, stage1_scores, top_clusters
from .step import KernelHead

__all__ = ["MODES", "Centroids", "KernelHead", "backend_for", "cluster_logits", "float_centroids", "greedy",
           "int4_centroids", "int8_centroids", "stage1_scores", "top_clusters"]
