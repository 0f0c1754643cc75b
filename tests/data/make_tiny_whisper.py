"""Make tests/data/tiny-whisper: a Whisper of random weights in CTranslate2's format.

It is no speech recognizer (it transcribes any audio into random tokens);
it is there so that the faster-whisper engine runs the real faster-whisper
and CTranslate2 on a real model directory in the tests, without weights that
would have to be downloaded. One encoder and one decoder layer, d_model 64,
a byte-level BPE tokenizer trained on a few words plus Whisper's special
tokens (the language codes are faster-whisper 1.2.1's), float16: ~0.7 MB.

Run once, where transformers, torch, tokenizers, ctranslate2 and
faster-whisper are installed (the tests do not need to run it):

    python tests/data/make_tiny_whisper.py tests/data/tiny-whisper
"""

import json
import os
import shutil
import sys
import tempfile


def main(out):
    import ctranslate2
    import torch
    from faster_whisper.tokenizer import _LANGUAGE_CODES
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, WhisperConfig,
                              WhisperForConditionalGeneration)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["one two three four five six seven eight nine zero"] * 50,
                                  trainer)
    specials = (["<|endoftext|>", "<|startoftranscript|>"]
                + ["<|{}|>".format(code) for code in _LANGUAGE_CODES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                   "<|nocaptions|>", "<|notimestamps|>"])
    tokenizer.add_special_tokens(specials)
    ids = {token: tokenizer.token_to_id(token) for token in specials}
    work = tempfile.mkdtemp()
    try:
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                       bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                       additional_special_tokens=specials[1:])
        fast.save_pretrained(work)
        eot = ids["<|endoftext|>"]
        config = WhisperConfig(
            vocab_size=len(fast) + 1501,  # the text and special tokens, then 1501 timestamps
            num_mel_bins=80, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
            decoder_attention_heads=2, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_source_positions=1500, max_target_positions=448,
            decoder_start_token_id=ids["<|startoftranscript|>"], pad_token_id=eot,
            bos_token_id=eot, eos_token_id=eot, suppress_tokens=[], begin_suppress_tokens=[eot])
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
        model.generation_config.suppress_tokens = []
        model.generation_config.begin_suppress_tokens = [eot]
        model.generation_config.alignment_heads = [[0, 0], [0, 1]]
        model.save_pretrained(work)
        ctranslate2.converters.TransformersConverter(work, copy_files=["tokenizer.json"]).convert(
            out, quantization="float16", force=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(out, "config.json")) as handle:
        written = json.load(handle)
    # The converter takes the language ids from attributes that newer transformers
    # releases no longer set; without them the model counts as English-only.
    written["lang_ids"] = sorted(ids["<|{}|>".format(code)] for code in _LANGUAGE_CODES)
    with open(os.path.join(out, "config.json"), "w") as handle:
        json.dump(written, handle, indent=1)
    print("wrote", out, sorted(os.listdir(out)))


if __name__ == "__main__":
    main(sys.argv[1])
