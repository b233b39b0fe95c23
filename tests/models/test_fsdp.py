"""SmolVLM sharded with FSDP over two CPU processes (gloo) vs one unsharded process, fp32.

Each rank takes one example of a two-example image–caption batch (data parallelism, as FSDP training runs). With
the loss normalised by the batch's total target count and scaled by the world size (HF Trainer's rule), FSDP's
averaged gradient is the whole batch's, so one AdamW step must give the single process's loss, grad norm and weights;
rank 0 exports the gathered weights as an HF checkpoint, which is what is compared.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fms.models import get_model
from torch.distributed.fsdp import FullyShardedDataParallel

from fms_smolvlm.hf_api import export_hf_checkpoint, fms_to_hf_state_dict
from fms_smolvlm.processing import SmolVLMPreprocessor
from fms_smolvlm.training import build_example, collate, fsdp_wrap, num_label_tokens, training_loss, unsharded_model
from tests.hf_reference import hf_model
from tests.models.test_training import (
    GRAD_NORM_RTOL,
    LR,
    MAX_GRAD_NORM,
    WEIGHT_DECAY,
    assert_weights_close,
    samples,
)

WORLD_SIZE = 2
# fp32. The sharded forward runs the same ops on the same gathered weights: equal up to thread scheduling.
LOGITS_ATOL = 1e-6
# The gradients differ in summation order only (per-rank sums averaged by a reduce-scatter instead of one sum over
# the padded batch): the loss to ~1e-7 relative; the grad norm and the weights as in the training-parity test.
LOSS_RTOL = 1e-6


def build_examples(checkpoint):
    """The first two training-parity samples (13 and 9 tiles): one per rank."""
    preprocessor = SmolVLMPreprocessor.from_pretrained(checkpoint)
    examples = [build_example(preprocessor, *sample) for sample in samples()[:WORLD_SIZE]]
    return examples, preprocessor.tokenizer.pad_token_id


def run_rank(rank: int, checkpoint, rendezvous: str, out_dir) -> None:
    torch.set_num_threads(1)  # two ranks share the cores
    # loaded before the process group exists: with one, get_model would pick tensor parallelism
    model = get_model("hf_pretrained", model_path=str(checkpoint)).train()
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        model = fsdp_wrap(model)
        examples, pad_id = build_examples(checkpoint)
        batch = collate([examples[rank]], pad_id).to(next(model.parameters()).device)
        with torch.no_grad():
            logits = model(batch.input_ids, pixel_values=batch.pixel_values, position_ids=batch.position_ids)

        num_items = num_label_tokens(batch.labels)
        dist.all_reduce(num_items)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        # FSDP averages gradients over ranks; the world-size factor makes that average the batch's gradient
        loss = training_loss(model, batch, num_items) * WORLD_SIZE
        loss.backward()
        grad_norm = model.clip_grad_norm_(MAX_GRAD_NORM)  # FSDP's: the global norm over all ranks' shards
        optimizer.step()
        batch_loss = loss.detach() / WORLD_SIZE
        dist.all_reduce(batch_loss)

        units = sorted({type(unit.module).__name__ for unit in FullyShardedDataParallel.fsdp_modules(model)})
        local_numel = sum(p.numel() for p in model.parameters())
        trained = unsharded_model(model)  # collective: every rank takes part
        if rank == 0:
            export_hf_checkpoint(trained, out_dir / "hf")
        result = dict(
            logits=logits, loss=batch_loss.item(), grad_norm=grad_norm.item(), units=units, local_numel=local_numel
        )
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(checkpoint, tmp_path_factory):
    """The ranks' results, and the directory of the HF checkpoint rank 0 exported after the step."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    rendezvous = f"file://{out_dir / 'rendezvous'}"
    mp.spawn(run_rank, args=(checkpoint, rendezvous, out_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)], out_dir / "hf"


def test_fsdp_shards_the_blocks(checkpoint, fsdp_run):
    sharded_results, _ = fsdp_run
    full_numel = sum(p.numel() for p in get_model("hf_pretrained", model_path=str(checkpoint)).parameters())
    for result in sharded_results:
        # FMS's policy: every class named like a layer or block (or derived from one: SigLIPFeedForward is a
        # FeedForwardBlock), and the root (SmolVLM) for the rest
        assert result["units"] == ["LLaMABlock", "SigLIPFeedForward", "SiglipEncoderLayer", "SmolVLM"]
        # each rank holds half of every flat parameter (rounded up)
        assert full_numel / WORLD_SIZE <= result["local_numel"] < full_numel / WORLD_SIZE + 16


def test_sharded_logits_equal_unsharded(checkpoint, fsdp_run):
    sharded_results, _ = fsdp_run
    model = get_model("hf_pretrained", model_path=str(checkpoint)).train()
    examples, pad_id = build_examples(checkpoint)
    for example, result in zip(examples, sharded_results):
        batch = collate([example], pad_id)
        with torch.no_grad():
            expected = model(batch.input_ids, pixel_values=batch.pixel_values, position_ids=batch.position_ids)
        assert result["logits"].shape == expected.shape
        assert (result["logits"] - expected).abs().max() <= LOGITS_ATOL


def test_adamw_step_equals_single_process(checkpoint, fsdp_run):
    sharded_results, exported = fsdp_run
    model = get_model("hf_pretrained", model_path=str(checkpoint)).train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples, pad_id = build_examples(checkpoint)
    batch = collate(examples, pad_id)  # right-padded
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss = training_loss(model, batch)  # the mean over the whole batch's targets
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()

    for result in sharded_results:
        assert result["loss"] == pytest.approx(loss.item(), rel=LOSS_RTOL)
        # AdamW's step hardly depends on the gradient's scale; the norm pins it
        assert result["grad_norm"] == pytest.approx(grad_norm.item(), rel=GRAD_NORM_RTOL)
    assert grad_norm > MAX_GRAD_NORM  # clipping took part
    assert max((param - initial[name]).abs().max() for name, param in model.named_parameters()) > 0.5 * LR
    # the sharded weights, gathered and exported by rank 0, as HF loads them
    assert_weights_close(hf_model(exported).state_dict(), fms_to_hf_state_dict(model.state_dict(), model.config))
