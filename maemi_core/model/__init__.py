"""The MAEMI model: gated cross-attention, DyQLoRA-FA, the vision-language model, generation."""
