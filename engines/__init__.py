"""Build-time model conversion (GGUF → ONNX); needs ``gazecam[engines]``, never torch."""
