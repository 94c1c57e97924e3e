"""Model compression: weight-only quantization (int8 / int4 / NF4, GPTQ, QAT) and pruning
(magnitude, Wanda, 2:4) over the plain params dict of `llm.model.transformer`."""
