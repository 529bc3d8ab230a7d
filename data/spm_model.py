"""Loading SentencePiece models and finding their special ids, without importing megatron-core
(tokenizer training and the preprocessing workers need only this)."""
import os

import sentencepiece as spm

from gridtrain.errors import UserError

# The control piece `gridtrain tokenizer train` reserves for the end of a document. A control
# piece is never produced by encoding text, so a document containing the literal string cannot
# fake a document boundary.
EOD_PIECE = "<eod>"


def load_processor(model_path: str) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, turning a missing or corrupt file into a UserError."""
    if not os.path.isfile(model_path):
        raise UserError(f"tokenizer={model_path!r}: no such file; give the .model written by "
                        "`gridtrain tokenizer train` or an existing SentencePiece model")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(model_path)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"tokenizer={model_path!r}: not a SentencePiece model ({exc})") from exc
    return processor


def special_ids(processor: spm.SentencePieceProcessor) -> dict:
    """bos/eos/pad/unk/eod ids of a model; -1 where the model has no such piece."""
    eod = processor.PieceToId(EOD_PIECE)
    if eod == processor.unk_id() or processor.IdToPiece(eod) != EOD_PIECE:
        eod = processor.eos_id()  # an external model: Megatron-LM's convention
    return {
        "bos": processor.bos_id(), "eos": processor.eos_id(), "pad": processor.pad_id(),
        "unk": processor.unk_id(), "eod": eod,
    }
