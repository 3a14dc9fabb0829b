"""Evaluation of explanations (docs/evaluation.md): is an explanation right?

:mod:`.localization` (AUPRC, pointing game, Otsu IoU/Dice, relevance mass against lesion masks),
:mod:`.faithfulness` (deletion/insertion), :mod:`.sanity` (cascading randomization), :mod:`.text`
(Greedy Matching Score against reports), :mod:`.concepts` (concept discovery from the atlas),
:mod:`.stats` (bootstrap intervals), :mod:`.methods` (every method's map on the CAM grid, baselines
included), :mod:`.masks` (the one reader of mask images), :mod:`.results` (the one per-image record
and the one summary, shared with the workbench's Evaluate page), :mod:`.context`, :mod:`.runner` and
:mod:`.report` (the ``deepminer evaluate-explanations`` run and its files), :mod:`.figures`. Each
metric is a short pure function with its paper in the docstring.
"""
