#!/usr/bin/env python3
"""The Python side of scripts/prepare_bench.sh (a check, never a run-time dependency).

    prepare_bench.py train-bpe INPUT OUT.json      # byte-level BPE, 4096 tokens, <|endoftext|>
    prepare_bench.py encode TOKENIZER.json CORPUS  # Hugging Face `tokenizers` on the corpus

`encode` reads the corpus in pieces of about 1 MiB cut like Switchyard's prepare-data (at a
line break after an ASCII letter or digit), encodes them 16 at a time with
`encode_batch_fast` (the library's own threads: every core) and prints one JSON line:
bytes, tokens, seconds, MB/s. Nothing is written.
"""
import json
import sys
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PIECE = 1 << 20
BATCH = 16


def train_bpe(inp: str, out: str) -> None:
    # The settings of Switchyard's own `Tokenizer::train_bpe` (trainer/src/data/tokenizer.rs).
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=0,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([inp], trainer)
    tok.save(out)


def pieces(path: str):
    with open(path, "rb") as f:
        buf = b""
        while True:
            more = f.read(PIECE)
            buf += more
            cut = -1
            start = PIECE
            while True:
                i = buf.find(b"\n", start)
                if i < 0:
                    break
                if buf[i - 1 : i].isalnum():
                    cut = i
                    break
                start = i + 1
            if cut >= 0:
                yield buf[:cut].decode("utf-8")
                buf = buf[cut:]
            elif not more:
                if buf:
                    yield buf.decode("utf-8")
                return


def encode(tokenizer: str, corpus: str) -> None:
    tok = Tokenizer.from_file(tokenizer)
    t0 = time.perf_counter()
    n_bytes = n_tokens = 0
    batch = []

    def flush():
        nonlocal n_tokens
        for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
            n_tokens += len(enc.ids)
        batch.clear()

    for text in pieces(corpus):
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == BATCH:
            flush()
    flush()
    seconds = time.perf_counter() - t0
    print(json.dumps({"bytes": n_bytes, "tokens": n_tokens, "seconds": round(seconds, 2),
                      "mb_s": round(n_bytes / 1e6 / seconds, 2)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["train-bpe"] and len(sys.argv) == 4:
        train_bpe(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["encode"] and len(sys.argv) == 4:
        encode(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
