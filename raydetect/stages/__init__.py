"""The detector's stages, each chosen on its own (:mod:`~raydetect.stages.base`): preprocess on
the CPU (:mod:`~raydetect.stages.preprocess`) or the GPU (:mod:`~raydetect.stages.gpu_preprocess`),
postprocess with NumPy NMS (:mod:`~raydetect.stages.postprocess`), torch batched NMS
(:mod:`~raydetect.stages.gpu_postprocess`) or the engine's own rows."""
