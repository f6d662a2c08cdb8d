"""KCD inside trainers people already use.

* :mod:`kcd_fast.integrations.lightning` — ``KCDCallback``, a Lightning 2.x callback that records the
  student's entropies each step (Eq. 7, 12), condenses at stage ends (Eq. 13) and feeds the condensed
  set back through a sampler it owns; Lightning itself is imported only when the callback is.

The timm recipe (the lines to add to timm's ``train.py``) needs no code of its own: it is
:class:`~kcd_fast.KnowledgeCondenser`, :class:`~kcd_fast.KCDDataset` and the condenser's sampler, as
docs/integrations.md shows.
"""
