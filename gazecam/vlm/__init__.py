"""The vision-language engine (SmolVLM architecture): its checkpoints (``checkpoint``,
``install``) and the preprocessing of crops and frames for its ONNX vision encoder
(``preprocess``). Runtime code: numpy, Pillow and ONNX Runtime; never torch."""
