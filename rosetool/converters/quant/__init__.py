"""Quantized weights as a layer of the file format: decoded when read, encoded when written.

`scheme` reads a config's quantization_config, `codecs` holds the arithmetic, `decode` presents a
quantized checkpoint's tensors as the logical ones the specs map, `encode` writes FP8 that vLLM serves.
"""
