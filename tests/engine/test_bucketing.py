"""Sequence-length bucketing (`bucket=m`): each batch cut or padded to a multiple of m tokens. On
fresh random models and variable-length data in float64, bucketed rows equal unbucketed rows and
batch-size-1 autograd (identity and dropout), through the public API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dropinf
from dropinf.data.text import bucket_batch
from dropinf.errors import DropinfError

from .models import TextNet, randomize, reference_bs1


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def dynamic_batches(n, vocab, seed, batch_size=3, max_len=13, keys=("input_ids", "attention_mask")):
    """Variable-length examples, each batch right-padded to its own longest (as a collate would)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    batches = []
    for s in range(0, n, batch_size):
        ls = lengths[s:s + batch_size]
        T = int(ls.max())
        ids = torch.randint(1, vocab, (len(ls), T), generator=g)
        mask = (torch.arange(T)[None] < ls[:, None]).long()
        batch = {keys[0]: ids.masked_fill(mask == 0, 0), keys[1]: mask}
        batch["y"] = torch.randint(3, (len(ls),), generator=g)
        batches.append(batch)
    return batches


def hf_lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)
    tok = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return (tok * mask).sum(1) / mask.sum(1)


def textnet_loss(model, batch):
    return F.cross_entropy(model(batch["ids"], batch["mask"]), batch["y"], reduction="none")


def gpt2(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=19, n_positions=32, n_embd=8, n_layer=2, n_head=2,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).double()
    for p in model.parameters():  # random norms too
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0, 0.3)
    return model


CASES = {
    "gpt2": (lambda seed: gpt2(seed), hf_lm_loss, {}, ("input_ids", "attention_mask")),
    "textnet": (lambda seed: randomize(TextNet(vocab=19), seed).double(), textnet_loss, {"bucket_mask": "mask"},
                ("ids", "mask")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("compressor", ["identity", "dropout"])
@pytest.mark.parametrize("bucket", [4, 8])
def test_bucketed_rows_equal_unbucketed_and_autograd(case, compressor, bucket):
    seed = torch.seed() % 10_000
    build, loss, opts, keys = CASES[case]
    model = build(seed)
    data = dynamic_batches(11, 19, seed, keys=keys)
    widths = {b[keys[1]].shape[1] for b in data}
    buck = {bucket_batch(b, bucket, keys[1])[keys[1]].shape[1] for b in data}
    assert all(w % bucket == 0 for w in buck) and len(buck) <= len(widths)
    names = [n for n, _ in model.named_parameters()]
    r = None if compressor == "identity" else 40
    plain = dropinf.extract(model, loss, data, compressor, r=r, seed=1, **opts)
    got = dropinf.extract(model, loss, data, compressor, r=r, seed=1, bucket=bucket, **opts)
    ref = reference_bs1(model, loss, data, names)
    if compressor == "dropout":
        ref = ref[:, dropinf.compressor("dropout", dim=ref.shape[1], r=40, seed=1).indices]
    assert got.shape == plain.shape == ref.shape
    assert rel_err(got, plain) < 1e-10, f"seed {seed}"
    assert rel_err(got, ref) < 1e-10, f"seed {seed}"


def test_bucket_batch_cuts_only_all_padding_columns_and_pads_with_the_datas_padding():
    ids = torch.tensor([[5, 6, 7, 9, 9, 9], [1, 2, 9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    labels = torch.tensor([[5, 6, 7, -100, -100, -100], [1, 2, -100, -100, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "y": torch.tensor([0, 1])}
    cut = bucket_batch(batch, 2)
    assert cut["input_ids"].tolist() == [[5, 6, 7, 9], [1, 2, 9, 9]] and cut["attention_mask"].shape == (2, 4)
    assert cut["y"] is batch["y"]
    assert bucket_batch(cut, 2) is cut and bucket_batch(cut, 4) is cut  # already the bucketed width
    assert bucket_batch(batch, 3)["input_ids"].shape == (2, 3)
    wide = bucket_batch(batch, 8)
    assert wide["input_ids"][:, 6:].eq(9).all() and wide["attention_mask"][:, 6:].eq(0).all()
    assert wide["labels"][:, 6:].eq(-100).all() and torch.equal(wide["input_ids"][:, :6], ids)
    full = {"input_ids": torch.tensor([[3, 4, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    padded = bucket_batch(full, 4)  # no padding to copy: 0, mask 0
    assert padded["input_ids"].tolist() == [[3, 4, 5, 0]] and padded["attention_mask"].tolist() == [[1, 1, 1, 0]]


def test_a_model_that_reads_padding_is_refused():
    """Mean over every position, mask ignored: cutting padding changes the loss, so bucketing must stop."""
    class Unmasked(TextNet):
        def forward(self, ids, mask):
            return super().forward(ids, torch.ones_like(mask))

    model = randomize(Unmasked(vocab=19), 0).double()
    data = dynamic_batches(6, 19, 0, keys=("ids", "mask"))
    with pytest.raises(DropinfError, match=r"bucket=8: the loss of example \d+ changes"):
        dropinf.extract(model, textnet_loss, data, "identity", bucket=8, bucket_mask="mask")


def test_bucketing_needs_a_mask():
    model = randomize(TextNet(vocab=19), 0).double()
    data = dynamic_batches(3, 19, 0, keys=("ids", "mask"))
    with pytest.raises(DropinfError, match="bucket=4: bucketing needs dict batches with a 'attention_mask'"):
        dropinf.extract(model, textnet_loss, data, "identity", bucket=4)
