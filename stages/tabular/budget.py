"""How much training a table gets: `tabular.train.batch_size: auto` and `epochs: auto`.

The rule (measured on real tables, docs/tabular.md): a batch of about one 64th of the
training rows, a power of two in [32, 2048], so every epoch is about 64 to 128 optimizer
steps whatever the size, and larger tables pay less Python per row; then enough epochs
for about STEPS steps in all (at least one epoch, at most MAX_EPOCHS: on small tables the
loop's fixed cost per epoch, a checkpoint and a validation pass, outweighs its steps).
A 300-row table gets batch 32 and 50 epochs; 6.5k training rows get batch 64 and 20
epochs; 35k get batch 512 and 29 epochs; 200k get batch 2048 and 21 epochs. An integer
in params.yaml is used as it is.
"""

from __future__ import annotations

import math

from stages.core.schema import TabularTrain

ROWS_PER_STEP = 64  # batch ≈ training rows / this
MIN_BATCH, MAX_BATCH = 32, 2048
STEPS = 2000  # optimizer steps the epochs add up to
MAX_EPOCHS = 50


def auto_batch_size(rows: int) -> int:
    """The power of two at or below rows / ROWS_PER_STEP, within [MIN_BATCH, MAX_BATCH]."""
    target = max(rows // ROWS_PER_STEP, 1)
    return min(max(2 ** int(math.log2(target)), MIN_BATCH), MAX_BATCH)


def auto_epochs(rows: int, batch_size: int) -> int:
    steps_per_epoch = max(math.ceil(rows / batch_size), 1)
    return min(max(math.ceil(STEPS / steps_per_epoch), 1), MAX_EPOCHS)


def resolve(train: TabularTrain, rows: int) -> TabularTrain:
    """`train` with `auto` batch_size and epochs replaced by the rule's numbers for a
    training split of `rows` rows."""
    batch = auto_batch_size(rows) if train.batch_size == "auto" else train.batch_size
    epochs = auto_epochs(rows, batch) if train.epochs == "auto" else train.epochs
    return train.model_copy(update={"batch_size": batch, "epochs": epochs})
