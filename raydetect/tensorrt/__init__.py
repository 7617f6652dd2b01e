"""TensorRT engines beside the runtime (:mod:`raydetect.engines.tensorrt`): building
(:mod:`~raydetect.tensorrt.build`), the precision and NMS rules (:mod:`~raydetect.tensorrt.rules`)
and decoding in-engine NMS outputs (:mod:`~raydetect.tensorrt.outputs`). The engine cache they
share with the compiled torch engine is :mod:`raydetect.engine_cache`."""
