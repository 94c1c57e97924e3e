"""Hub-layout Hugging Face directories with a byte-level BPE tokenizer.json, built locally, to
check `tools.hf import` of tokenizer.json-only models without downloading one.

    python -m tools.make_bpe_hf_dirs --out=runs/bpe [--vocab_size=50257] [--seed=0]

Trains a byte-level BPE with `tokenizers` on the embedded corpus (stdlib + docs), then writes
  OUT/hf_gpt2    GPT2TokenizerFast (<|endoftext|> = bos = eos = unk, no pad, nothing added by
                 the post-processor) + a random GPT2LMHeadModel (n_embd 128, 2 layers);
  OUT/hf_llama3  Llama-3's layout: <|begin_of_text|> (bos, added by a TemplateProcessing
                 post-processor), <|end_of_text|> (eos) and reserved specials, added after the
                 BPE ids outside its vocabulary, no pad/unk + a random untied GQA
                 LlamaForCausalLM (hidden 128, 2 layers, 4 heads, 2 kv heads);
both with `save_pretrained` (safetensors). Weights are random: for id, logit and round-trip
checks (docs/interop.md), not for quality.
"""

from __future__ import annotations

import argparse
import os
import sys


def byte_bpe(kind: str, texts: list[str], vocab_size: int, reserved: int):
    """A byte-level BPE trained with `tokenizers` on `texts`, as a transformers fast tokenizer
    laid out as the hub's:
      "gpt2"   -- GPT2TokenizerFast; <|endoftext|> (a special token inside the BPE vocabulary,
                  so `vocab_size` ids in all) is bos = eos = unk, no pad, nothing added by the
                  post-processor;
      "llama3" -- PreTrainedTokenizerFast in Llama-3's layout: <|begin_of_text|> (bos, added by
                  a TemplateProcessing post-processor), <|end_of_text|> (eos) and `reserved`
                  <|reserved_special_token_i|>, added after the `vocab_size` BPE ids, outside
                  its vocabulary (vocab_size + 2 + reserved ids in all); no pad, no unk.
    `vocab_size` is the BPE trainer's (an upper bound: a small corpus may give fewer merges);
    `reserved` is ignored for "gpt2". Deterministic: the same arguments give the same
    tokenizer.json."""
    import transformers
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if kind not in ("gpt2", "llama3"):
        raise ValueError(f"byte_bpe: kind={kind!r}, not 'gpt2' or 'llama3'")
    specials = (["<|endoftext|>"] if kind == "gpt2" else
                ["<|begin_of_text|>", "<|end_of_text|>"] +
                [f"<|reserved_special_token_{i}|>" for i in range(reserved)])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials if kind == "gpt2" else [],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token=specials[0],
                                              eos_token=specials[0], unk_token=specials[0])
    # As Llama-3: the specials after the BPE ids, outside its vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = (specials[0], tok.token_to_id(specials[0]))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1",
                                      special_tokens=[bos])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0],
                                                eos_token=specials[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_bpe_hf_dirs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        print(f"make_bpe_hf_dirs: error: --vocab_size={args.vocab_size} must be >= 300 (256 "
              "bytes, the special tokens and some merges)", file=sys.stderr)
        return 2
    import torch
    import transformers

    from llm.data.sources import embedded_corpus

    texts = [d.text for d in embedded_corpus(include_docs=True, include_tests=False)]
    reserved = 4
    for kind in ("gpt2", "llama3"):
        # --vocab_size counts every id: Llama-3's 2 + `reserved` added specials come out of the
        # BPE's share (GPT-2's one special is inside it).
        bpe_size = args.vocab_size - (2 + reserved if kind == "llama3" else 0)
        fast = byte_bpe(kind, texts, bpe_size, reserved)
        torch.manual_seed(args.seed)
        if kind == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=len(fast), n_embd=128, n_layer=2, n_head=4, n_positions=1024,
                eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, tie_word_embeddings=False,
                eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id))
        out = os.path.join(args.out, f"hf_{kind}")
        fast.save_pretrained(out)
        model.save_pretrained(out)
        print(f"{out}: {len(fast)} ids, {type(model).__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
