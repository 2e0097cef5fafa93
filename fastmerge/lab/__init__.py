"""The paper in miniature (docs/lab.md): two synthetic languages, tiny Llama models trained
on the CPU, and every merge through ``fastmerge.merge``. Needs the ``lab`` extra; not
imported by ``import fastmerge``."""
