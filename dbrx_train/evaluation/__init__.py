"""Evaluation: perplexity on held-out MDS streams and llm-foundry's ICL tasks, standalone
(`dbrx_train/eval.py`) or at an interval during training."""
