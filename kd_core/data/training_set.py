"""A split encoded for training: under the student's tokenizer, or under the student's and the teacher's at once
(cross-tokenizer methods, :mod:`kd_core.data.paired`). The run folder's loader that reads the split first:
:func:`kd_core.run.load_train_set`."""

from __future__ import annotations

from kd_core.data.tokenize import encode_rows
from kd_core.errors import DataError


def encode_training_set(cfg, rows: list[dict], split: str, tokenizer, loss_on_prompt: bool = False,
                        teacher_tokenizer=None, with_offsets: bool = False):
    """`rows` of split `split` encoded for training as the config says (`cfg.data.template`, `cfg.tokenizer`:
    max_length, overlong): (EncodedDataset, rows dropped as overlong); with `teacher_tokenizer`, (PairedDataset, rows
    dropped on either side). A DataError when no row fits max_length."""
    template, limit, overlong = cfg.data.template, cfg.tokenizer.max_length, cfg.tokenizer.overlong
    if teacher_tokenizer is None:
        ds, dropped = encode_rows(rows, tokenizer, template, limit, overlong, loss_on_prompt)
    else:
        from kd_core.data.paired import encode_paired_rows

        ds, dropped = encode_paired_rows(rows, tokenizer, teacher_tokenizer, template, limit, overlong,
                                         loss_on_prompt, with_offsets)
    if len(ds) == 0:
        either = "" if teacher_tokenizer is None else " under the student's or the teacher's tokenizer"
        raise DataError(f"split {split!r}: every example is longer than tokenizer.max_length={limit}{either}")
    return ds, dropped
