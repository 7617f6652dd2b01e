"""ONNX graph tools: shape folding and batch rewrites (:mod:`~raydetect.onnx.fold`) and the
ONNX → torch conversion the torch engine runs (:mod:`~raydetect.onnx.to_torch`)."""
