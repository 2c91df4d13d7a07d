from .lm import Block, TransformerLM, build_model, count_params, pathway_params

__all__ = ["Block", "TransformerLM", "build_model", "count_params", "pathway_params"]
