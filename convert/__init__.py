"""gridtrain.convert: Hugging Face and GGUF export, Hugging Face import, weight sources."""
