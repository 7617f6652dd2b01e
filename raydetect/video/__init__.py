"""Video archives as an input of the batch job.

Modules: :mod:`~raydetect.video.probe` (open through fsspec, stream facts),
:mod:`~raydetect.video.segments` (pure integer-PTS segment planning and sampling),
:mod:`~raydetect.video.gate` (motion gating), :mod:`~raydetect.video.decode` (frames of one
segment, damage as errors), :mod:`~raydetect.video.nvdec` (GPU decode when available),
:mod:`~raydetect.video.detect` (one segment → frame rows), :mod:`~raydetect.video.pipeline`
(Ray Data wiring, output, per-video summary); the CLI flags come from
:class:`raydetect.config.VideoConfig` (:mod:`raydetect.cli.detect`).
"""
