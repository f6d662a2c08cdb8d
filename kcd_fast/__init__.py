"""kcd_fast: GPU-accelerated Knowledge Condensation Distillation (Li et al., ECCV 2022).

* :mod:`kcd_fast.ops` — the operators: ``update_values`` (Eq. 7, 12), ``rank``
  (Eq. 13), ``condense`` (Eq. 8, 13-15) and ``vaks_mix_`` (Eq. 14).
* :mod:`kcd_fast.reference` — the float64 reference of every equation.
* :class:`KnowledgeCondenser` — the EM stage loop (Alg. 1) as a drop-in library, with
  :class:`KCDDataset` (VAKS on the inputs) and its sampler.
* :class:`KnowledgeBuffer` — the teacher's soft labels cached per sample (dense or top-k), with
  VAKS applied to them in place.
"""
from kcd_fast import ops, reference
from kcd_fast.condenser import KCDDataset, KeptSampler, KnowledgeCondenser
from kcd_fast.knowledge import KnowledgeBuffer, KnowledgeFileError
from kcd_fast.ops import CondensePlan, condense, rank, update_values, vaks_mix_

__version__ = "0.1.0"

__all__ = ["ops", "reference", "update_values", "rank", "condense", "vaks_mix_", "CondensePlan",
           "KnowledgeCondenser", "KCDDataset", "KeptSampler", "KnowledgeBuffer", "KnowledgeFileError",
           "__version__"]
