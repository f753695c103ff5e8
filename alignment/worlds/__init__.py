"""The worlds an experiment runs in: tabular (N prompts with K listed candidates each, reward and safety
tables and π_ref as logits, where the constrained optimum is exact and the algorithms are tested to tight
tolerances), toy (a seeded synthetic safety world of templated text, lexical gold scorers and a tiny reference
Llama, all made by code, so the language-model pipeline runs end to end on a CPU) and language (any causal LM
on real prompt sets or preference data, with learned scorers). Each world supplies the prompts, π_ref and the
scorers; the experiment and its algorithms are the same in all of them.
"""
