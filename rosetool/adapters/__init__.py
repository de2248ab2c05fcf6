"""LoRA adapters: HF PEFT and Megatron-Bridge layouts, merged into a base as it streams, or converted
between layouts through the mapping specs (`lora` binds and maps, `merge` merges, `convert` converts)."""
