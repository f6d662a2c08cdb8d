"""kcd_fast: GPU-accelerated Knowledge Condensation Distillation (Li et al., ECCV 2022).

* :mod:`kcd_fast.ops` — the operators: ``update_values`` (Eq. 7, 12), ``rank``
  (Eq. 13), ``condense`` (Eq. 8, 13-15) and ``vaks_mix_`` (Eq. 14).
* :mod:`kcd_fast.reference` — the float64 reference of every equation.
* :class:`KnowledgeCondenser` — the EM stage loop (Alg. 1) as a drop-in library
  (:mod:`kcd_fast.condenser`), with :class:`KCDDataset` (VAKS on the inputs), its sampler
  :class:`KeptSampler` and :class:`NoSingletonBatches` (:mod:`kcd_fast.sampling`).
* :class:`KnowledgeBuffer` — the teacher's soft labels cached per sample (dense or top-k), with
  VAKS applied to them in place (:mod:`kcd_fast.knowledge`; its file format in
  :mod:`kcd_fast.knowledge_file`).
* :mod:`kcd_fast.checks` — the argument validators every module uses, and the debug mode.
"""
from kcd_fast import ops, reference
from kcd_fast.condenser import KnowledgeCondenser
from kcd_fast.knowledge import KnowledgeBuffer, KnowledgeFileError
from kcd_fast.ops import CondensePlan, condense, rank, update_values, vaks_mix_
from kcd_fast.sampling import KCDDataset, KeptSampler, NoSingletonBatches

__version__ = "0.1.0"

__all__ = ["ops", "reference", "update_values", "rank", "condense", "vaks_mix_", "CondensePlan",
           "KnowledgeCondenser", "KCDDataset", "KeptSampler", "NoSingletonBatches", "KnowledgeBuffer",
           "KnowledgeFileError", "__version__"]
