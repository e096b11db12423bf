"""Checkpoint, adapter, ONNX and package writers (installed as ``edgeqra.exporters``)."""
