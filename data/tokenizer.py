"""SentencePiece behind megatron-core's tokenizer interface, so GPTDataset can read our shards.

Works for models trained by `gridtrain tokenizer train` (which carry a dedicated end-of-document
piece) and for any existing SentencePiece `.model`, e.g. a Llama tokenizer (where, as in
Megatron-LM's GPTSentencePieceTokenizer, the end of a document is the eos token)."""
import logging
import os

import numpy as np
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from gridtrain.data.spm_model import EOD_PIECE, load_processor, special_ids
from gridtrain.errors import UserError


class SentencePieceTokenizer(MegatronLegacyTokenizer):
    """A SentencePiece model as a megatron-core (0.16) legacy tokenizer."""

    def __init__(self, model_path: str):
        # megatron-core 0.16 warns that the legacy base class is deprecated; its datasets still
        # require it (the contract we serve), so the warning is noise on every rank.
        base_logger = logging.getLogger(MegatronLegacyTokenizer.__module__)
        level = base_logger.level
        base_logger.setLevel(logging.ERROR)
        try:
            super().__init__(os.path.abspath(model_path))
        finally:
            base_logger.setLevel(level)
        self.model_path = model_path
        self.processor = load_processor(model_path)
        self._special = special_ids(self.processor)
        if self._special["eod"] < 0:
            raise UserError(f"tokenizer={model_path!r}: the model has neither an {EOD_PIECE} "
                            "nor an eos piece; documents could not be separated in the shards")
        self._vocab = None

    def tokenize(self, text: str) -> list[int]:
        return self.processor.EncodeAsIds(text)

    def detokenize(self, ids) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.processor.DecodeIds([int(i) for i in ids])

    @property
    def vocab(self) -> dict:
        if self._vocab is None:
            self._vocab = {self.processor.IdToPiece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> dict:
        return {i: piece for piece, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._special["eod"]

    @property
    def bos(self) -> int:
        return self._special["bos"]

    @property
    def eos(self) -> int:
        return self._special["eos"]

    @property
    def pad(self) -> int:
        return self._special["pad"]

    @property
    def special_ids(self) -> dict:
        return dict(self._special)
