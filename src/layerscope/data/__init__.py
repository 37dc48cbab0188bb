"""Data: text corpora, instruction sets with prompt templates, multiple-choice tasks, batching.

Every source becomes a list of :class:`ScoredSequence` (token ids plus the positions scored), and
:func:`make_batches` turns those into length-sorted, right-padded :class:`Batch` es.
"""

from layerscope.data.batching import make_batches
from layerscope.data.builtin import builtin_corpus
from layerscope.data.corpus import (
    CORPORA,
    SHARED_DATA_ENV,
    adds_bos,
    encode,
    lm_sequences,
    load_texts,
    shared_data_dir,
    split_wikitext,
    window_targets,
)
from layerscope.data.instructions import (
    INSTRUCTION_SETS,
    TEMPLATES,
    InstructionExample,
    instruction_sequences,
    load_instructions,
    render,
)
from layerscope.data.multiple_choice import (
    MC_TASKS,
    MCItem,
    choice_lengths,
    load_mc,
    mc_sequences,
    split_context,
)
from layerscope.data.sequences import Batch, ScoredSequence

__all__ = [
    "Batch",
    "CORPORA",
    "INSTRUCTION_SETS",
    "InstructionExample",
    "MCItem",
    "MC_TASKS",
    "SHARED_DATA_ENV",
    "ScoredSequence",
    "TEMPLATES",
    "adds_bos",
    "builtin_corpus",
    "choice_lengths",
    "encode",
    "instruction_sequences",
    "lm_sequences",
    "load_instructions",
    "load_mc",
    "load_texts",
    "make_batches",
    "mc_sequences",
    "render",
    "shared_data_dir",
    "split_context",
    "split_wikitext",
    "window_targets",
]
