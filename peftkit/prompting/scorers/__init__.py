"""Zero- and few-shot scorers: label log-probabilities from a (model, tokenizer) pair.

- :func:`score_causal` — a causal LM's log P(label words | prompt). Each prompt runs
  through the model once; every label continuation is scored from its cached prefix.
- :func:`score_embedding` — cosine of mean-pooled encoder embeddings, text vs label.
- :func:`score_nli` — an NLI model's entailment of "This example is {label}.".
- :func:`score_masked_lm` — a masked LM's log-probability of the label words at the mask.

Each returns :class:`LabelScores`: log-probs per (example, label) as a numpy array, plus
predictions and how many inputs were cut to fit the context::

    from peftkit.prompting.templates import load_prompt
    from peftkit.prompting.scorers import score_causal

    prompt = load_prompt("sentiment", "lm-eval-sst2")
    scores = score_causal(model, tokenizer, prompt, ["a charming journey ."], batch_size=16)
    scores.logprobs          # array (1, 2): log P(" negative" | prompt), log P(" positive" | ...)
    scores.predicted_labels  # ['positive']

Label words are tokenized on their own (without special tokens), so their tokens are the
same after every prompt; write a leading space where the model expects one (" positive").

The causal scorer lives in ``scorers.causal``, the encoder ones in ``scorers.encoders``, and
what they share (``LabelScores``, the context length, phrase handling) in ``scorers.common``.
"""

from peftkit.prompting.scorers.causal import (
    STRATEGY_NAMES,
    causal_encoder,
    causal_strategy,
    continuation_logprobs,
    domain_logprobs,
    naive_continuation_logprobs,
    score_causal,
)
from peftkit.prompting.scorers.common import LabelScores, context_length
from peftkit.prompting.scorers.encoders import (
    embed_texts,
    score_embedding,
    score_masked_lm,
    score_nli,
)

__all__ = [
    "STRATEGY_NAMES",
    "LabelScores",
    "causal_encoder",
    "causal_strategy",
    "context_length",
    "continuation_logprobs",
    "domain_logprobs",
    "embed_texts",
    "naive_continuation_logprobs",
    "score_causal",
    "score_embedding",
    "score_masked_lm",
    "score_nli",
]
