"""RowSparseAdamW and the sparse-aware clip (common/optim.py) against the obvious version: a dense embedding
gradient, torch's clip_grad_norm_ and torch's fused AdamW."""

import copy

import pytest
import torch
from numerics import U32, assert_within, gamma

from common.optim import RowSparseAdamW, build_adamw, clip_grad_norm_

pytestmark = pytest.mark.numerics

# Steps touch rows the earlier ones did not and skip rows they did (their moments decay without a gradient),
# accumulate two micro batches (an uncoalesced sparse gradient), and leave most rows untouched throughout.
BATCHES = [[[1, 2, 2], [3, 4, 1]], [[10, 11, 12], [10, 13, 14]], [[1, 20, 21], [2, 2, 2]], [[40, 41, 3], [3, 3, 3]]]


def run(sparse: bool, clip: float, weight_decay: float = 0.1, H: int = 32):
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(50, H), torch.nn.Linear(H, 1)
    model = torch.nn.Sequential(emb, head)
    opt = build_adamw(model, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                      sparse_embedding=emb if sparse else None)
    assert isinstance(opt, RowSparseAdamW) == sparse and emb.sparse == sparse
    norms = []
    for step in BATCHES:
        for ids in step:
            head(emb(torch.tensor([ids]))).pow(2).sum().backward()
        assert emb.weight.grad.is_sparse == sparse
        norms.append(clip_grad_norm_(model.parameters(), clip) if sparse else
                     torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, torch.stack(norms)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_row_sparse_adamw_equals_dense_adamw_exactly(weight_decay):
    """Without clipping (the coefficient is exactly 1), the row-sparse step runs the same fused kernel on the same
    numbers, and untouched rows get the same decay multiply, so weights and moments are bitwise equal. H = 32 keeps
    the kernel's vector/tail split the same for a gathered row block as for the whole tensor."""
    dense, dense_opt, _ = run(False, clip=1e9, weight_decay=weight_decay)
    sparse, sparse_opt, _ = run(True, clip=1e9, weight_decay=weight_decay)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(dense_opt.state[a][key], sparse_opt.state[b][key]), key
    touched = {i for step in BATCHES for ids in step for i in ids}
    moved = (sparse_opt.state[sparse[0].weight]["exp_avg_sq"] != 0).any(1).nonzero().flatten().tolist()
    assert set(moved) == touched


def test_clip_with_sparse_gradient_equals_dense_clip():
    """With clipping active, the total norm (from the sparse values) and every weight stay within the rounding bound
    of the dense run: the norms sum the same squares in another order, off by at most gamma(n) relative, and the
    clipped gradients carry that relative error into AdamW (its update m / sqrt(v) is scale-free to first order, so
    the weights move by at most lr x 2 gamma(n) per step from this, plus the rounding of the update itself)."""
    dense, _, n_dense = run(False, clip=0.05)
    sparse, _, n_sparse = run(True, clip=0.05)
    assert (n_dense > 0.05).all()  # clipping was active at every step
    n = sum(p.numel() for p in dense.parameters())
    assert_within(n_sparse, n_dense.double(), 2 * gamma(n) * n_dense.double(), "total norm")
    lr, steps = 0.05, len(BATCHES)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        bound = steps * (lr * 2 * gamma(n) + 8 * U32 * (a.detach().abs().double() + lr))
        assert_within(b, a.double(), bound, "weights")


def test_row_sparse_adamw_resumes_from_a_dense_checkpoint():
    """The state_dict is AdamW's: a RowSparseAdamW loaded from a dense AdamW run's checkpoint continues with the rows
    that have moments as its active rows, equal to the dense run."""
    torch.manual_seed(0)
    dense, dense_opt, _ = run(False, clip=1e9)
    emb, head = torch.nn.Embedding(50, 32), torch.nn.Linear(32, 1)
    model = torch.nn.Sequential(emb, head)
    model.load_state_dict(dense.state_dict())
    opt = build_adamw(model, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, sparse_embedding=emb)
    opt.load_state_dict(copy.deepcopy(dense_opt.state_dict()))  # its own tensors, as after a checkpoint load
    for ids in ([[5, 1, 2]], [[7, 7, 1]]):  # one more step on both: row 5 and 7 are new, 1 and 2 have moments
        for m, o in ((dense, dense_opt), (model, opt)):
            m(torch.tensor(ids)).pow(2).sum().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for a, b in zip(dense.parameters(), model.parameters()):
        assert torch.equal(a, b)
