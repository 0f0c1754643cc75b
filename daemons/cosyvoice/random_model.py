"""`python -m modelhost.daemons.cosyvoice.random_model CHECKOUT OUT_DIR`: a CosyVoice2 model
directory with random weights, to smoke-test a venv and a checkout without the 5 GB download.

Not a model: it speaks noise. It has the files CosyVoice2.__init__ reads at the
pinned commit, built from the checkout's own examples/libritts/cosyvoice2/conf/
cosyvoice2.yaml (upstream's modules, random weights), with three small
stand-ins where the real ones cannot be made up: a byte-level BPE tokenizer and
a 2-layer Qwen2 (hidden size 896, as the yaml expects) in CosyVoice-BlankEN, and
two tiny ONNX graphs with the speaker model's and the speech tokenizer's inputs
and outputs. With it, upstream's whole inference path runs on a CPU through
the real CosyVoiceEngine: prompt files, zero-shot, cross-lingual, instruct,
registered voices, streaming, tiers.

Run it with the cosyvoice venv's interpreter, plus `onnx` (torch.onnx.export
needs it; the daemon does not): `uv pip install --python VENV/bin/python onnx==1.16.0`.
"""

import json
import os
import shutil
import sys


def build(checkout, out):
    sys.path[:0] = [os.path.join(checkout, "third_party", "Matcha-TTS"), checkout]
    import torch
    from hyperpyyaml import load_hyperpyyaml
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    blank = os.path.join(out, "CosyVoice-BlankEN")
    os.makedirs(blank, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["Hello, this sentence warms the model up.", "The quick brown fox jumps.",
              "希望你以后能够做的比我还好呦。", "收到好友从远方寄来的生日礼物"] * 50
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(blank)
    config_path = os.path.join(blank, "tokenizer_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # what AutoTokenizer builds again
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=2048, hidden_size=896, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True)).save_pretrained(blank, safe_serialization=True)

    yaml_path = os.path.join(checkout, "examples", "libritts", "cosyvoice2", "conf",
                             "cosyvoice2.yaml")
    shutil.copy(yaml_path, os.path.join(out, "cosyvoice2.yaml"))
    with open(yaml_path) as handle:
        configs = load_hyperpyyaml(handle, overrides={"qwen_pretrain_path": blank})
    for name in ("llm", "flow", "hift"):
        torch.save(configs[name].state_dict(), os.path.join(out, name + ".pt"))

    class SpeakerModel(torch.nn.Module):  # fbank [1, T, 80] -> embedding [1, 192]
        def __init__(self):
            super(SpeakerModel, self).__init__()
            self.proj = torch.nn.Linear(80, 192)

        def forward(self, feat):
            return self.proj(feat.mean(dim=1))

    class SpeechTokenizer(torch.nn.Module):  # whisper mel [1, 128, T], [1] -> tokens [1, T/4]
        def __init__(self):
            super(SpeechTokenizer, self).__init__()
            self.conv = torch.nn.Conv1d(128, 64, 4, stride=4)
            self.head = torch.nn.Linear(64, 6561)

        def forward(self, feats, feats_length):
            keep = (feats_length.to(feats.dtype) > 0).to(feats.dtype)  # an input ONNX keeps
            tokens = self.head(self.conv(feats * keep).transpose(1, 2)).argmax(dim=-1)
            return tokens.to(torch.int32)

    torch.onnx.export(SpeakerModel(), (torch.randn(1, 100, 80),),
                      os.path.join(out, "campplus.onnx"), input_names=["input"],
                      output_names=["embedding"], dynamic_axes={"input": {1: "T"}})
    torch.onnx.export(SpeechTokenizer(), (torch.randn(1, 128, 400),
                                          torch.tensor([400], dtype=torch.int32)),
                      os.path.join(out, "speech_tokenizer_v2.onnx"),
                      input_names=["feats", "feats_length"], output_names=["tokens"],
                      dynamic_axes={"feats": {2: "T"}, "tokens": {1: "N"}})
    return sorted(os.listdir(out))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print("built {}: {}".format(sys.argv[2], ", ".join(build(os.path.abspath(sys.argv[1]),
                                                              os.path.abspath(sys.argv[2])))))
