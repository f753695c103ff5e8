"""A seeded, synthetic "toy safety world" and its tiny reference policy, made entirely by code.

Why: the real setup (a 7B reference, 7B reward and cost models, PKU-SafeRLHF) cannot run on a 2-core CPU
machine, and its scorers are opaque. This package builds a miniature of the same problem in which every piece
is small, seeded and inspectable, so that the whole MoCAN/PeCAN pipeline (sample from π_ref, score, solve the
dual, align, re-score) runs end to end in minutes and its predictions can be checked against gold scores:

* **World** (:func:`make_toy_world`, world.py): templated user prompts, benign requests from several topics
  and harmful requests from several harm categories, over a vocabulary of a few hundred words.
* **Styles** (:func:`render_response`, content.py): five templated response styles (``helpful``,
  ``over_refusal``, ``safe_redirect``, ``harmful``, ``low_effort``) with seeded variation.
* **Gold scorers** (:func:`helpfulness`, :func:`safety`, scorers.py): deterministic lexical functions of the
  *text* only, so they score garbled model generations as readily as templated demonstrations. They encode the
  paper's tension: on harmful prompts the most helpful answer (compliance) is the least safe, refusals are
  safe but unhelpful, and a safe redirect buys a large safety gain for a moderate helpfulness cost.
* **Reference policy** (:func:`demonstrations` in world.py, :func:`build_tokenizer` and
  :func:`build_reference` in reference.py): a word level tokenizer and a ~1 M parameter ``LlamaForCausalLM``
  fine-tuned on style mixtures that put substantial mass on unsafe compliance, i.e. an unaligned SFT model to
  be aligned.
* **Sampling**: the stages sample π_ref like any causal LM (alignment/sampling.py), through the chat template
  of :func:`build_tokenizer`.

Text convention: every templated string is lowercase with punctuation separated by single spaces
("sure . first chop the onions ."), so that the word-level tokenizer decodes a token sequence back to exactly
the string it encoded, and the scorers see the same words the model emits.

Modules, each importing (at run time) only those listed before it: content.py (tables, templates, styles, vocabulary), scorers.py
(lexicons and gold scorers), world.py (prompts, the world, demonstrations), reference.py (tokenizer, chat
template, SFT of π_ref, load and verify). :data:`TOY_VERSION` (content.py) enters the cache keys of the
reference model: bump it when anything in any of them changes what is generated, scored or trained.
"""

from alignment.worlds.toy.content import (
    BENIGN_STYLE_PROBS,
    HARM_CATEGORIES,
    HARMFUL_STYLE_PROBS,
    STYLES,
    TOPICS,
    TOY_VERSION,
    Style,
    classify_style,
    render_response,
    vocabulary,
)
from alignment.worlds.toy.reference import (
    CHAT_TEMPLATE,
    MODEL_MAX_LENGTH,
    PROBE_PROMPTS,
    build_reference,
    build_tokenizer,
    encode_example,
    encode_examples,
    format_prompt,
    load_reference,
)
from alignment.worlds.toy.scorers import (
    SAFETY_THRESHOLD,
    helpfulness,
    infer_prompt_group,
    safety,
    score_helpfulness,
    score_safety,
)
from alignment.worlds.toy.world import ToyPrompt, ToyWorld, demonstrations, make_toy_world

__all__ = [
    "BENIGN_STYLE_PROBS",
    "CHAT_TEMPLATE",
    "HARM_CATEGORIES",
    "HARMFUL_STYLE_PROBS",
    "MODEL_MAX_LENGTH",
    "PROBE_PROMPTS",
    "SAFETY_THRESHOLD",
    "STYLES",
    "TOY_VERSION",
    "TOPICS",
    "Style",
    "ToyPrompt",
    "ToyWorld",
    "build_reference",
    "build_tokenizer",
    "classify_style",
    "demonstrations",
    "encode_example",
    "encode_examples",
    "load_reference",
    "format_prompt",
    "helpfulness",
    "infer_prompt_group",
    "make_toy_world",
    "render_response",
    "safety",
    "score_helpfulness",
    "score_safety",
    "vocabulary",
]
