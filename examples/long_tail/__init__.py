"""The long-tail demo: margin losses, Fair Loss and a frequency schedule on synthetic long-tailed identities.

Run it as ``marginkit demo`` or, from the repository root, ``python -m examples.long_tail``.
Files: ``data.py`` (the dataset), ``heads.py`` (network and losses), ``train.py`` (training
and metrics), ``fair_paper.py`` (the Fair Loss paper's offline phase), ``study.py``
(the multi-seed, multi-skew study), ``report.py`` (tables, CSV, plots), ``demo.py`` (the CLI).
"""
