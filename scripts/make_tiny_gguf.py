"""Write a tiny random-weight llama GGUF that llama.cpp really loads and generates from.

The model has a SentencePiece-style vocabulary of `<unk>`, `<s>`, `</s>` and the 256 byte tokens, two layers
of width 64 and a chat template, and weighs well under 1 MB. `--pad-mb N` widens the feed-forward layers
with random Q8_0 blocks so that benchmarks get a multi-GB file that is still a loadable model; the padding
is generated and written in chunks, so memory stays flat whatever the size. The same seed gives the same
bytes.

    python scripts/make_tiny_gguf.py OUT.gguf [--seed N] [--context-length N] [--pad-mb N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCH = "llama"
WIDTH = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention, so that head_count_kv differs from head_count
HEAD_DIM = WIDTH // HEADS
BASE_FFN = 128
Q8_BLOCK = 32  # elements per Q8_0 block
Q8_BLOCK_BYTES = 34  # float16 scale + 32 int8 quants
PAD_CHUNK_BLOCKS = 1 << 15  # ~1 MiB of Q8_0 blocks per write
WEIGHT_STD = 0.02
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ChunkSource = Callable[[], Iterator[bytes]]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor: GGUF name, numpy-order shape (rows, columns), type and a source of its bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: gguf.GGMLQuantizationType
    nbytes: int
    chunks: ChunkSource


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    scores = [0.0] * len(tokens)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    return tokens, scores, [int(t) for t in types]


def ffn_width(pad_mb: int) -> int:
    """Feed-forward width giving about `pad_mb` MiB of Q8_0 feed-forward weights (3 matrices per layer)."""
    if pad_mb <= 0:
        return BASE_FFN
    bytes_per_unit = 3 * LAYERS * WIDTH * Q8_BLOCK_BYTES // Q8_BLOCK
    units = (pad_mb << 20) // bytes_per_unit
    return max(BASE_FFN, -(-units // Q8_BLOCK) * Q8_BLOCK)


def dense_tensor(name: str, values: np.ndarray[Any, Any]) -> TensorPlan:
    dtype = gguf.GGMLQuantizationType.F32 if values.dtype == np.float32 else gguf.GGMLQuantizationType.F16
    data = values.tobytes()
    return TensorPlan(name, tuple(values.shape), dtype, len(data), lambda: iter([data]))


def random_q8_tensor(name: str, shape: tuple[int, int], seed: int) -> TensorPlan:
    """Random int8 quants with one fixed small scale: incompressible like real Q8_0 and numerically tame."""
    n_blocks = shape[0] * shape[1] // Q8_BLOCK
    scale = np.frombuffer(np.float16(WEIGHT_STD / 73.0).tobytes(), dtype=np.uint8)

    def chunks() -> Iterator[bytes]:
        rng = np.random.default_rng(seed)
        for start in range(0, n_blocks, PAD_CHUNK_BLOCKS):
            count = min(PAD_CHUNK_BLOCKS, n_blocks - start)
            blocks = np.empty((count, Q8_BLOCK_BYTES), dtype=np.uint8)
            blocks[:, :2] = scale
            blocks[:, 2:] = np.frombuffer(rng.bytes(count * Q8_BLOCK), dtype=np.uint8).reshape(count, Q8_BLOCK)
            yield blocks.tobytes()

    return TensorPlan(name, shape, gguf.GGMLQuantizationType.Q8_0, n_blocks * Q8_BLOCK_BYTES, chunks)


def plan_tensors(seed: int, ffn: int) -> list[TensorPlan]:
    rng = np.random.default_rng(seed)
    n_vocab = len(vocabulary()[0])
    kv_width = KV_HEADS * HEAD_DIM

    def matrix(rows: int, cols: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal((rows, cols)) * WEIGHT_STD).astype(np.float16)

    def norm() -> np.ndarray[Any, Any]:
        return np.ones(WIDTH, dtype=np.float32)

    def ffn_matrix(name: str, shape: tuple[int, int], index: int) -> TensorPlan:
        if ffn == BASE_FFN:
            return dense_tensor(name, matrix(*shape))
        return random_q8_tensor(name, shape, seed * 1000 + index)

    plans = [dense_tensor("token_embd.weight", matrix(n_vocab, WIDTH))]
    for layer in range(LAYERS):
        prefix = f"blk.{layer}"
        plans += [
            dense_tensor(f"{prefix}.attn_norm.weight", norm()),
            dense_tensor(f"{prefix}.attn_q.weight", matrix(WIDTH, WIDTH)),
            dense_tensor(f"{prefix}.attn_k.weight", matrix(kv_width, WIDTH)),
            dense_tensor(f"{prefix}.attn_v.weight", matrix(kv_width, WIDTH)),
            dense_tensor(f"{prefix}.attn_output.weight", matrix(WIDTH, WIDTH)),
            dense_tensor(f"{prefix}.ffn_norm.weight", norm()),
            ffn_matrix(f"{prefix}.ffn_gate.weight", (ffn, WIDTH), 3 * layer + 1),
            ffn_matrix(f"{prefix}.ffn_up.weight", (ffn, WIDTH), 3 * layer + 2),
            ffn_matrix(f"{prefix}.ffn_down.weight", (WIDTH, ffn), 3 * layer + 3),
        ]
    plans += [dense_tensor("output_norm.weight", norm()), dense_tensor("output.weight", matrix(n_vocab, WIDTH))]
    return plans


def add_metadata(writer: gguf.GGUFWriter, context_length: int, ffn: int) -> None:
    tokens, scores, types = vocabulary()
    writer.add_name("airgap-tiny")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_context_length(context_length)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def make_tiny_gguf(path: Path, seed: int = 0, context_length: int = 256, pad_mb: int = 0) -> Path:
    """Write the tiny model to `path` and return it; `pad_mb` adds about that many MiB of random weights."""
    ffn = ffn_width(pad_mb)
    plans = plan_tensors(seed, ffn)
    writer = gguf.GGUFWriter(path, ARCH)
    add_metadata(writer, context_length, ffn)
    for plan in plans:
        add_tensor_info(writer, plan)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        out = writer.fout[0]
        writer.write_padding(out, out.tell())
        for plan in plans:
            written = 0
            for chunk in plan.chunks():
                out.write(chunk)
                written += len(chunk)
            if written != plan.nbytes:
                raise RuntimeError(f"tensor {plan.name}: wrote {written} bytes, planned {plan.nbytes}")
            writer.write_padding(out, plan.nbytes)
    finally:
        writer.close()
    return path


def add_tensor_info(writer: gguf.GGUFWriter, plan: TensorPlan) -> None:
    if plan.dtype == gguf.GGMLQuantizationType.Q8_0:
        # quantized tensors are declared by their byte shape, which the writer converts back to elements
        byte_shape = (plan.shape[0], plan.nbytes // plan.shape[0])
        writer.add_tensor_info(plan.name, byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.dtype)
        return
    element = np.float32 if plan.dtype == gguf.GGMLQuantizationType.F32 else np.float16
    writer.add_tensor_info(plan.name, plan.shape, np.dtype(element), plan.nbytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--context-length", type=int, default=256, help="context length written in the metadata")
    parser.add_argument("--pad-mb", type=int, default=0, help="widen the model with about N MiB of random weights")
    args = parser.parse_args(argv)
    path = make_tiny_gguf(args.out, seed=args.seed, context_length=args.context_length, pad_mb=args.pad_mb)
    print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
