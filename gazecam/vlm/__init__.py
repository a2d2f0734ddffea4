"""The vision-language engine: SmolVLM (Idefics3) checkpoints, vision encoder and decoder."""
