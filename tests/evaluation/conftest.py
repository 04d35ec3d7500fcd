"""Direct computations of what each ICL metric must report, from the model alone.

Each helper takes a batch as llm-foundry's ICL datasets build it (the prompts are llm-foundry's
business) and recomputes the answer example by example: no padding, no batching, no KV cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.tokenizer import EOS_ID

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope='module')
def from_the_repository_root():
    """The shipped YAMLs name their files relative to the repository root, where the README's commands run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        yield


def real_tokens(batch) -> list[torch.Tensor]:
    """Each example's tokens without its padding (llm-foundry pads with `<|pad|>`, left or right)."""
    return [row[mask] for row, mask in zip(batch['input_ids'], batch['attention_mask'].bool())]


@torch.no_grad()
def chosen_options(model, batch) -> list[int]:
    """Multiple choice and schema: for each question, the option whose continuation tokens have the
    lowest mean cross-entropy (llm-foundry's rule), each option run through the model alone."""
    losses = []
    for tokens, span in zip(real_tokens(batch), batch['continuation_indices']):
        logits = model(tokens[None])[0]
        losses.append(F.cross_entropy(logits[span - 1], tokens[span]).item())
    return [min(range(start, end), key=losses.__getitem__) - start for start, end in batch['choice_groupings']]


@torch.no_grad()
def greedy_continuations(model, batch) -> list[torch.Tensor]:
    """Language modelling: the model's greedy prediction at each continuation position."""
    return [model(tokens[None])[0, span - 1].argmax(-1) for tokens, span in
            zip(real_tokens(batch), batch['continuation_indices'])]


@torch.no_grad()
def greedy_answers(model, batch, tokenizer) -> list[str]:
    """Generation: each prompt decoded greedily by full forward passes, up to the batch's
    max_new_tokens or <|endoftext|>, then cut at the first of the task's stop sequences."""
    answers = []
    for tokens in real_tokens(batch):
        new = []
        for _ in range(batch['generation_kwargs']['max_new_tokens']):
            token = int(model(torch.cat([tokens, torch.tensor(new, dtype=tokens.dtype)])[None])[0, -1].argmax())
            if token == EOS_ID:
                break
            new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        for stop in batch['stopping_criteria'] or ():
            text = text.split(stop)[0]
        answers.append(text)
    return answers


def exact_match(answer: str, accepted: list[str]) -> bool:
    """llm-foundry's exact match: the normalised answer starts with a normalised accepted answer."""
    from llmfoundry.eval.metrics import InContextLearningGenerationExactMatchAccuracy

    normalize = InContextLearningGenerationExactMatchAccuracy().normalize_answer
    return any(normalize(answer).startswith(normalize(label)) for label in accepted)


def direct_accuracy(model, batch, tokenizer) -> list[bool]:
    """Whether each example of an ICL batch is answered right, by the helpers above."""
    if batch['mode'] == 'generate':
        return [exact_match(a, labels) for a, labels in zip(greedy_answers(model, batch, tokenizer), batch['labels'])]
    if 'choice_groupings' in batch:
        return [chosen == gold for chosen, gold in zip(chosen_options(model, batch), batch['gold_indices'])]
    targets = [tokens[span] for tokens, span in zip(real_tokens(batch), batch['continuation_indices'])]
    return [bool((p == t).all()) for p, t in zip(greedy_continuations(model, batch), targets)]
