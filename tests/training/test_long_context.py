"""DBRX's 32K context: one Composer training step on a packed 32768-token row, on CPU."""

import pytest
import torch
from composer import Trainer
from torch.utils.data import DataLoader

from dbrx_train.composer_model import ComposerDbrx
from dbrx_train.constants import IGNORE_INDEX
from dbrx_train.data.finetuning import collate_finetuning
from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig

MAX_SEQ_LEN = 32768
EXAMPLES = (20000, 1, 9000, 3000)  # uneven, one of a single token; 767 tokens of padding end the row
VOCAB = 256


def packed_row() -> dict[str, torch.Tensor]:
    """A batch of one row as `FinetuningDataset` packs it and `collate_finetuning` pads it to the
    longest row of its batch (here a 32768-token one): examples side by side, numbered in `sequence_id`."""
    input_ids = torch.randint(0, VOCAB, (sum(EXAMPLES),), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[torch.tensor((0, *EXAMPLES)).cumsum(0)[:-1]] = IGNORE_INDEX  # an example's first token is no target
    sequence_id = torch.repeat_interleave(torch.arange(len(EXAMPLES)), torch.tensor(EXAMPLES))
    full = {'input_ids': torch.zeros(MAX_SEQ_LEN, dtype=torch.long)}  # the longest row of the batch
    batch = collate_finetuning([{'input_ids': input_ids, 'labels': labels, 'sequence_id': sequence_id},
                                {**full, 'labels': full['input_ids'], 'sequence_id': full['input_ids']}])
    row = {name: column[:1] for name, column in batch.items()}
    row['input_ids'][row['sequence_id'] == -1] = 0  # <|pad|> lies outside the tiny vocabulary
    return row


@pytest.fixture
def model() -> ComposerDbrx:
    torch.manual_seed(0)
    return ComposerDbrx(ModelConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=MAX_SEQ_LEN, vocab_size=VOCAB,
                                    attn_config=AttentionConfig(kv_n_heads=1),
                                    ffn_config=FFNConfig(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)))


def test_one_training_step_on_a_packed_32k_row(model):
    row = packed_row()
    assert row['input_ids'].shape == (1, MAX_SEQ_LEN) and row['sequence_id'][0, -767:].eq(-1).all()

    # The packed loss is the examples' own losses, token-weighted: nothing attends across them.
    with torch.no_grad():
        packed = model.model.loss(row['input_ids'], row['labels'], sequence_id=row['sequence_id']).lm_loss
        total, count, start = 0.0, 0, 0
        for length in EXAMPLES:
            labels = row['labels'][:, start : start + length]
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += n * model.model.loss(row['input_ids'][:, start : start + length], labels).lm_loss.item()
                count += n
            start += length
    torch.testing.assert_close(packed.item(), total / count, rtol=1e-5, atol=0)

    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, train_dataloader=DataLoader([row], batch_size=None), max_duration='1ba',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), device='cpu', progress_bar=False,
                      device_train_microbatch_size=1, run_name='long-context', loggers=[])
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 1
    assert torch.isfinite(trainer.state.loss['total'])
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    trainer.close()
