"""Export: HF -> GGUF conversion, quantization, the Ollama Modelfile, the model card, `tunefile doctor`."""
